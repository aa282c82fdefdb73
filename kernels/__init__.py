"""Our Triton kernels, each with its torch reference, and the adapters to other libraries' kernels.

Importing the package registers every implementation with kernels.dispatch.
"""
__nanopretrain__ = True  # tells our kernels apart from Hugging Face's `kernels` package (same name)

from kernels import attention, cross_entropy, newton_schulz  # noqa: E402,F401
from kernels import external  # noqa: E402,F401  (after ours: it builds on their references)
