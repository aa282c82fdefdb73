"""Data, tokenizer, optimizer, the training loop, evaluation and checkpoints."""
import model  # noqa: F401  (checks that the `kernels` package is ours)
