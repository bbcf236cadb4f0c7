"""Placeholder while this module is being written (this session)."""
GPT2 = GPT2Config = None
