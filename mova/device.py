"""Where and in which precision model code runs: the one place that knows about devices.

Every part of the system (training workers, feature actors, serving replicas, benchmarks)
picks its device and dtype here, so no code path is CUDA-only by accident and CPU runs
exercise the same placement (bf16 included) as GPU runs.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICES = ("auto", "cpu", "cuda")


def torch_dtype(name: str) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` (or ``fp32``/``bf16``/``fp16``) -> torch dtype."""
    key = PRECISIONS.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r}; expected one of {sorted(DTYPES)} or "
                         f"{sorted(PRECISIONS)}")
    return DTYPES[key]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None: CUDA when this process sees a GPU, else CPU. Asking for CUDA without
    one is an error naming the request."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}; expected one of {DEVICES}")
    if resolved.type == "cuda" and not cuda_available():
        raise ValueError(f"device={device!r} was asked for but torch sees no CUDA device")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Training/inference precision: ``auto`` is bf16 on a GPU and fp32 on a CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(precision)


def place(module: nn.Module, device: str | torch.device | None = "auto",
          dtype: torch.dtype | str | None = None) -> nn.Module:
    """Move a module to a device (resolved as above) and, when given, a floating dtype."""
    target = resolve_device(device)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    return module.to(device=target, dtype=dtype) if dtype is not None else module.to(target)


def to_model_inputs(tensor: torch.Tensor, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Move an input tensor to a model's device; floating inputs also take its dtype
    (integer inputs such as token ids or flattened patch indices keep theirs)."""
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)
