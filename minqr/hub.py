"""Names that live on the Hugging Face hub: the `gpt2` backbone and the hh-rlhf data.

Everything in minqr takes local paths. A hub name is resolved through `huggingface_hub` (a
dependency of `tokenizers`): first from the local cache (HF_HOME, no network), then by
downloading, which is announced. When the hub cannot be reached (no network, or HF_HUB_OFFLINE=1)
the result is one MinqrError that says what to download and where to put it.
"""
import re
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from minqr.errors import MinqrError

HH_RLHF_REPO = "Anthropic/hh-rlhf"
# The subsets with chosen/rejected pairs (red-team-attempts, also in the repo, has another format).
HH_RLHF_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_RLHF_SPLITS = ("train", "test")
# What the hub takes as a model's name: NAME or OWNER/NAME of ASCII letters, digits, "_", "-" and "."
# ("-" and "." neither first nor last; huggingface_hub also refuses ".." and "--"). Anything else
# (./x, /x, ~/x, runs/demo/x) can only be a local path.
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]*\w)?"
HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}", re.ASCII)
# What a backbone needs: config, safetensors weights (one file or shards), tokenizer files and the
# chat template (in tokenizer_config.json, or a file of its own in newer repositories).
MODEL_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt"]
# The same for a one-file model, as a command line to give the user (a sharded model needs its
# model.safetensors.index.json and model-*.safetensors instead of model.safetensors).
MODEL_FILES_TO_DOWNLOAD = "config.json model.safetensors tokenizer.json tokenizer_config.json vocab.json merges.txt"


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def fetch_hh_rlhf(subset: str, split: str, announce=_print_to_stderr) -> Path:
    """The local path of hh-rlhf's SUBSET/SPLIT.jsonl.gz, downloaded if it is not cached."""
    if subset not in HH_RLHF_SUBSETS:
        raise MinqrError(f"unknown hh-rlhf subset {subset!r}; the subsets are: {', '.join(HH_RLHF_SUBSETS)}")
    if split not in HH_RLHF_SPLITS:
        raise MinqrError(f"hh-rlhf has no split {split!r}; the splits are: {', '.join(HH_RLHF_SPLITS)}")
    filename = f"{subset}/{split}.jsonl.gz"
    url = f"https://huggingface.co/datasets/{HH_RLHF_REPO}/resolve/main/{filename}"
    offline_help = (
        f"download {url} to DIR/{filename} and pass --data DIR --subset {subset} (or the file itself "
        f"as --data); or run the same command once on a machine online, which fills the Hugging Face "
        f"cache (HF_HOME), and copy that cache here")

    def download(local_files_only: bool) -> str:
        return huggingface_hub.hf_hub_download(repo_id=HH_RLHF_REPO, repo_type="dataset",
                                               filename=filename, local_files_only=local_files_only)

    return _cached_or_downloaded(download, f"hh-rlhf:{subset} ({split})", offline_help, announce)


def fetch_model(name_or_path, announce=_print_to_stderr) -> Path:
    """A model folder: a local folder as it is, or a hub name (`gpt2`) downloaded or from the cache.

    Only the files a backbone needs are fetched (MODEL_FILES), not the TensorFlow, Flax, ONNX and
    PyTorch-pickle copies that model repositories also carry.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MinqrError(f"model {name_or_path!r} is a file; a model is a folder (config.json, "
                         "model.safetensors, tokenizer files) or a hub name such as gpt2")
    name = str(name_or_path)
    hub_like = HUB_ID.fullmatch(name) and ".." not in name and "--" not in name
    if not hub_like or (path.parent != Path(".") and path.parent.is_dir()):
        # a local path (a hub id's owner is not a folder here): a typo, never a download
        missing = next(p for p in [*reversed(path.parents), path] if not p.exists())
        raise MinqrError(f"no such model folder: {name!r} ({missing} does not exist; a model is a folder with "
                         "config.json and model.safetensors, or a hub name such as gpt2 or Qwen/Qwen2.5-0.5B)")
    offline_help = (
        f"on a machine online run `hf download {name} {MODEL_FILES_TO_DOWNLOAD} "
        f"--local-dir DIR`, copy DIR here and pass --model DIR; or run the same command once on a "
        f"machine online, which fills the Hugging Face cache (HF_HOME), and copy that cache here")

    def download(local_files_only: bool) -> str:
        return huggingface_hub.snapshot_download(repo_id=name, allow_patterns=MODEL_FILES,
                                                 local_files_only=local_files_only)

    return _cached_or_downloaded(download, f"model {name!r} (not a local folder)", offline_help, announce)


def _cached_or_downloaded(download, what: str, offline_help: str, announce) -> Path:
    try:
        return Path(download(local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.is_offline_mode():
        raise MinqrError(f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                         f"(unset it to download): {offline_help}")
    announce(f"minqr: downloading {what} from the Hugging Face hub")
    try:
        return Path(download(local_files_only=False))
    except LocalEntryNotFoundError as error:  # what huggingface_hub raises when the hub is unreachable
        raise MinqrError(f"cannot reach the Hugging Face hub for {what}: {offline_help}") from error
    except HfHubHTTPError as error:  # the hub answered: no such repository or file, gated, ...
        raise MinqrError(f"the Hugging Face hub refused {what}: {error}") from error
