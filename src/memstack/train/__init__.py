"""Training and evaluation: the loop, checkpoints with exact resume, passkey and perplexity evals."""
