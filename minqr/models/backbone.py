"""`load_backbone`: a Hugging Face folder -> the minqr backbone that its config.json's model_type
names: GPT2 (gpt2.py) for "gpt2", Llama (llama.py) for "llama", "qwen2" and "mistral".

Every backbone maps token ids `[B, T]` (with an optional padding mask or attention pattern, and
positions) to the hidden states `[B, T, hidden]` after its final norm, under the same contract
(gpt2.py's docstring). The folder may hold the bare model (GPT2Model, LlamaModel, ...) or one with
a head (GPT2LMHeadModel, LlamaForCausalLM, ...), in one safetensors file or sharded.
"""
from pathlib import Path

from minqr.errors import MinqrError
from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.hf_folder import load_gpt2, load_model, read_config
from minqr.models.llama import Llama, LlamaConfig

# model_type -> (minqr's module, its config, the start of transformers' class names: GPT2Model,
# Qwen2ForSequenceClassification, ...)
FAMILIES = {
    "gpt2": (GPT2, GPT2Config, "GPT2"),
    "llama": (Llama, LlamaConfig, "Llama"),
    "qwen2": (Llama, LlamaConfig, "Qwen2"),
    "mistral": (Llama, LlamaConfig, "Mistral"),
}


def load_backbone(path, dtype=None, device=None, dropout: float | None = None):
    """The backbone in the Hugging Face folder `path`, in eval mode: GPT2 or Llama, by the model_type
    of its config.json. `dtype=None` keeps the dtype stored in the file. `dropout` sets GPT-2's
    dropout probabilities (None keeps the config's); minqr's Llama has no dropout, as the released
    Llama-family models train without."""
    config = read_config(path)
    model_class, config_class, _ = family(config, path)
    if model_class is GPT2:
        return load_gpt2(path, dtype, device, dropout)
    if dropout:
        raise MinqrError(f"dropout {dropout}: minqr's {config['model_type']} backbone has no dropout; leave it out")
    return load_model(path, model_class, config_class.from_dict(config), dtype, device)


def family(config: dict, folder) -> tuple:
    """The FAMILIES entry of `config`, the config.json dict read from `folder`, by its model_type; an
    unknown model_type is a MinqrError that names the supported ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise MinqrError(f"{Path(folder) / 'config.json'} has model_type {model_type!r}, which minqr does not "
                         f"implement: supported are {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
