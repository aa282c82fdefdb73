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


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in percent, or None where the peak is unknown."""
    if not peak_flops:
        return None
    return 100.0 * flops_per_token * tokens_per_second / (peak_flops * world_size)
