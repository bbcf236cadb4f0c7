"""Placeholder while this module is being written (this session)."""
load_gpt2 = save_gpt2 = None
