"""Console lines, wandb, the local metrics file, and the MFU arithmetic."""

# Dense bf16 peak FLOP/s by device name (substring match, most specific first).
# Unknown devices get None: we print no MFU rather than a wrong one.
H100_PEAK_BF16 = 989e12
_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device from its name (torch.cuda.get_device_name), or None if unknown."""
    for key, peak in _PEAKS:
        if key in device_name:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float | None,
        world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in percent, or None where the peak is unknown."""
    if not peak_flops:
        return None
    return 100.0 * flops_per_token * tokens_per_second / (peak_flops * world_size)


class MetricsLog:
    """Where metrics go: a JSONL file next to the checkpoints (always, on rank 0) and wandb (unless run == "dummy").

    WANDB_MODE=offline is honoured by wandb itself; wandb is imported only when a run name is given.
    """

    def __init__(self, path, run: str = "dummy", config: dict | None = None, enabled: bool = True,
                 project: str = "nanopretrain"):
        import json
        from pathlib import Path

        from train.errors import UserError

        self._json = json
        self.enabled = enabled
        self.wandb = None
        self.file = None
        if not enabled:
            return
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1)
        except OSError as e:
            raise UserError(f"cannot write the metrics file {self.path}: {e.strerror or e}") from None
        if run != "dummy":
            try:
                import wandb
            except ImportError:
                raise UserError("--run names a wandb run but wandb is not installed: pip install -e .[wandb], "
                                "or pass --run dummy") from None
            self.wandb = wandb.init(project=project, name=run, config=config or {})

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(self._json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
