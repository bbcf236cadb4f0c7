"""Placeholder while this module is being written (this session)."""
load_tokenizer = None
