"""Where a model computes and in what precision: the rules that training and scoring share.

    device = resolve_device("auto")              # cuda when torch sees a GPU, else cpu
    dtype = autocast_dtype("auto", device)       # bfloat16 on a GPU, float32 elsewhere
    with autocast(device, dtype): ...

The weights always stay float32; a lower precision is autocast's, for the matrix products.
"""
from contextlib import nullcontext

import torch

from minqr.errors import MinqrError

# The --dtype choices; "auto" depends on the device (see autocast_dtype).
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device, local_rank: int | None = None) -> torch.device:
    """"auto" is cuda when torch sees a GPU, else cpu; anything else as torch.device reads it.

    `local_rank`: this process's index on its node under torchrun, where a bare "cuda" (or
    "auto" on a GPU machine) means the process's own GPU, cuda:LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MinqrError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:K") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinqrError(f"--device {name}: this torch sees no GPU; use --device cpu")
    return device


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The precision of the matrix products: "auto" is bfloat16 on a GPU, float32 elsewhere."""
    if name not in DTYPES:
        raise MinqrError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if DTYPES[name] is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The context to run a forward pass in: autocast to `dtype`, or nothing for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
