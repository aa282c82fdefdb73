"""Data, tokenizer, optimizer, the training loop, evaluation and checkpoints."""
