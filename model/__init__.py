"""nanochat's GPT, sized from one dial (depth)."""
