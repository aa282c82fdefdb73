"""One optimizer step as training runs it, the same for train.pretrain and bench.mfu (so the MFU we report is that
of the step training runs): grad_accum micro-steps, each a forward under autocast and a backward, the next batch
fetched while the device works; then the optimizer, at this step's schedules."""
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from train.dataloader import Batch
from train.optim import MuonAdamW, Schedule


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere (fp32 on the CPU)."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass
class TrainStep:
    model: torch.nn.Module  # what trains: the model, compiled or not
    optimizer: MuonAdamW
    schedule: Schedule
    batches: Iterator[Batch]  # endless
    grad_accum: int
    autocast: AbstractContextManager  # bf16 autocast on CUDA, nullcontext() elsewhere (reusable either way)
    batch: Batch  # the next micro-step's, fetched ahead: its resume_point is where a checkpoint resumes

    def __call__(self, step: int) -> tuple[torch.Tensor, float]:
        """Optimizer step number `step` (from 0); returns the mean loss of its micro-batches (a 0-d tensor on the
        device: reading it waits for the step) and the LR multiplier applied."""
        loss_sum = torch.zeros((), device=self.batch.inputs.device)
        for _ in range(self.grad_accum):
            with self.autocast:
                loss = self.model(self.batch.inputs, self.batch.targets) / self.grad_accum
            loss_sum += loss.detach()
            loss.backward()
            self.batch = next(self.batches)  # while the device runs the backward
        lrm = self.schedule.apply(self.optimizer, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, lrm
