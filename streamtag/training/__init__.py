"""Training and evaluation on labelled audio (torch side)."""
