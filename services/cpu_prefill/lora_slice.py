"""The one op a CPU prefill worker runs: a token slice's LoRA delta, ``x @ A @ B``."""

from __future__ import annotations

import torch


def lora_slice(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x @ A @ B`` for ``x: [n, in]``, ``A: [in, r]``, ``B: [r, out]`` (one dtype), written into
    the float32 view ``out: [n, out]``. ``x @ A`` is rounded to the weights' dtype, as the device
    path rounds it for prefill segments; ``(x @ A) @ B`` is accumulated and kept in float32, so the
    worker rounds the delta once, when it adds it."""
    low_rank = torch.mm(x, a)
    torch.mm(low_rank.float(), b.float(), out=out)


def lora_slice_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain float32 definition: ``[n, out]``."""
    return x.float() @ a.float() @ b.float()
