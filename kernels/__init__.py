"""Triton kernels, each with a plain-PyTorch reference and one dispatch point (kernels.dispatch)."""
