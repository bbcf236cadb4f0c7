"""The step both backbone benchmarks time (test_gpt2_speed.py, test_llama_speed.py)."""
import torch


def backbone_step(model, ids):
    """One forward+backward of a backbone (minqr's, or transformers' *Model) on token ids; its
    hidden states, to check against a reference after the timing."""
    model.zero_grad(set_to_none=True)
    out = model(ids)
    hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
    hidden.pow(2).mean().backward()
    return hidden.detach()
