"""nanochat's GPT, sized from one dial (depth).

Our top-level `kernels` package shares its name with Hugging Face's `kernels` (which nanochat uses to fetch
FlashAttention-3). In a regular install one overwrites the other, and in an editable one the first on the path
wins; importing this package checks, without importing it, that `kernels` is ours.
"""
import importlib.util
from pathlib import Path

KERNELS_MARK = "__nanopretrain__"  # set in our kernels/__init__.py


def check_kernels_package() -> None:
    spec = importlib.util.find_spec("kernels")
    init = Path(spec.origin) if spec is not None and spec.origin else None
    try:
        ours = init is not None and KERNELS_MARK in init.read_text(encoding="utf-8", errors="replace")
    except OSError:
        ours = False
    if not ours:
        raise ImportError(f"the `kernels` package at {init.parent if init else '(none)'} is not nanopretrain's "
                          "(Hugging Face's `kernels` has the same name): `pip uninstall kernels`, then reinstall "
                          "this project with `pip install -e .` from its checkout")


check_kernels_package()
