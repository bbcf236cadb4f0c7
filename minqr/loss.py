"""Placeholder while this module is being written (this session)."""
fused_available = qr_pairwise_loss = None
