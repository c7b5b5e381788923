"""Data: tokenizers (tokenizer), synthetic long-context tasks (tasks), real text corpora (text)."""
