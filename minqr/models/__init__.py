"""The networks. gpt2.py is GPT-2 in plain PyTorch (GPT2Config, GPT2), with module names that match
Hugging Face's checkpoint keys; llama.py is the Llama family (llama, qwen2, mistral) the same way
(LlamaConfig, Llama); hf_folder.py reads and writes Hugging Face model folders (config.json,
safetensors, sharded or not) with errors that name the file and the tensor; backbone.py is
load_backbone, which picks the family by config.json's model_type; tokenizer.py loads GPT-2's BPE
or any tokenizer.json through `tokenizers`, with its EOS, pad and chat template (chat_template.py,
the Jinja set-up that renders a conversation as transformers does); head.py is the
reward head as saved with a model (N outputs, its objective); reward.py is RewardModel, a backbone
+ the head, which returns its outputs (training's loss is minqr/training/loss.py's) and saves as
transformers' GPT2ForSequenceClassification (LlamaForSequenceClassification, ...); export.py
writes a quantile model as a one-output one.
"""
