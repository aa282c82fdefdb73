"""The local metrics file, wandb, and the MFU arithmetic."""
import errno
import json
import os
import shutil
from pathlib import Path

from train.errors import UserError, first_line
from train.paths import atomic_write

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

    WANDB_MODE=offline is honoured by wandb itself; wandb is imported only when a run name is given. A line
    that cannot be written whole (disk full) is taken back and stops the run with one line.
    """

    def __init__(self, path, run: str = "dummy", config: dict | None = None, enabled: bool = True,
                 project: str = "nanopretrain"):
        self.enabled, self.wandb, self.file = enabled, None, None
        if not enabled:
            return
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write the metrics file {self.path}: {e.strerror or e}") from None
        if run != "dummy":
            self.wandb = start_wandb(run, project, config or {})

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.file is None:  # opened at the first record: the file may be continued (rewritten) until then
            try:
                self.file = open(self.path, "ab", buffering=0)
            except OSError as e:
                raise UserError(f"cannot write the metrics file {self.path}: {e.strerror or e}") from None
        line = (json.dumps(metrics, allow_nan=False) + "\n").encode()
        end = os.fstat(self.file.fileno()).st_size
        try:
            if self.file.write(line) != len(line):
                raise OSError(errno.ENOSPC, "the line was written only in part")
        except OSError as e:
            os.ftruncate(self.file.fileno(), end)  # no half line left behind
            raise UserError(f"cannot append to the metrics file {self.path}: {e.strerror or e} (disk full?)") from None
        if self.wandb is not None:
            self.wandb.log(metrics)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run: str, project: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise UserError("--run names a wandb run but wandb is not installed: pip install -e .[wandb], "
                        "or pass --run dummy") from None
    try:
        return wandb.init(project=project, name=run, config=config)
    except Exception as e:  # noqa: BLE001 - wandb raises its own kinds: not logged in, offline, bad key
        raise UserError(f"wandb could not start run {run!r} ({first_line(e)}): `wandb login`, or WANDB_MODE=offline, "
                        "or --run dummy") from None


def continue_file(path, step: int | None, aside: Path | None = None) -> str | None:
    """Make the metrics file continue at a resumed step: drop the records of later steps (a killed run had
    logged them; the resumed run logs them again). On a fresh start (step None) an earlier run's file is moved
    aside. aside: a folder of set-aside checkpoints, which gets the file (fresh start) or a copy of it first.
    Returns what was done, if anything."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if step is None:
            moved = (aside or path.parent) / (path.name if aside else
                                              f"metrics.previous-{int(path.stat().st_mtime)}.jsonl")
            os.replace(path, moved)
            return f"an earlier run's {path.name} was moved to {moved}"
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
        dropped = len(lines) - len(kept)
        if not dropped:
            return None
        if aside:
            shutil.copy2(path, aside / path.name)
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in kept))
    except OSError as e:  # a full disk, a read-only folder
        raise UserError(f"cannot continue the metrics file {path} at step {step}: {e.strerror or e}") from None
    return f"dropped {dropped} record(s) after step {step} from {path.name} (logged again from here)"


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
