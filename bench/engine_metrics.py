"""Numbers the engine benchmark derives: latency summaries, decode-step FLOPs, the matmul peak.

Decode FLOPs are counted from the model shape, per decoded token:

* linear layers: ``2 * params`` of every decoder projection plus the LM head;
* LoRA: ``2 * r * (in + out)`` per adapted projection per layer, at the request's own rank
  (the useful work; BGMV's padding to the batch's max rank is not counted);
* attention: ``4 * ctx * (heads * head_dim)`` per layer (``q k^T`` and ``p v`` over ``ctx``
  cached tokens, the current one included).

Element-wise work (norms, RoPE, activation, softmax) is not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from shared.llama_shape import PROJECTIONS, LlamaShape

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"p50", "p90", "p99", "mean"}`` of ``values`` (seconds in, seconds out)."""
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values)
    return out


def linear_flops_per_token(shape: LlamaShape, vocab_size: int) -> int:
    """``2 * params`` of all decoder projections and the LM head."""
    per_layer = sum(i * o for i, o in (shape.proj_dims(p) for p in PROJECTIONS))
    return 2 * (shape.num_layers * per_layer + vocab_size * shape.hidden_size)


def lora_flops_per_token(shape: LlamaShape, rank: int, projections: Sequence[str] = PROJECTIONS) -> int:
    """``2 * r * (in + out)`` summed over the adapted projections of every layer."""
    return 2 * rank * shape.num_layers * sum(sum(shape.proj_dims(p)) for p in projections)


def attention_flops_per_token(shape: LlamaShape, context: int) -> int:
    """``4 * ctx * heads * head_dim`` per layer."""
    return 4 * context * shape.num_heads * shape.head_dim * shape.num_layers


def decode_step_flops(shape: LlamaShape, vocab_size: int, contexts: Sequence[int], ranks: Sequence[int]) -> int:
    """FLOPs of one decode step: one token per sequence at ``contexts[i]``, adapter rank ``ranks[i]`` (0 = none)."""
    base = linear_flops_per_token(shape, vocab_size)
    return sum(base + lora_flops_per_token(shape, r) + attention_flops_per_token(shape, c)
               for c, r in zip(contexts, ranks, strict=True))


def matmul_peak(device: str, size: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Best and median FLOP/s of a square bf16 ``torch.matmul`` (``size`` x ``size``) on ``device``."""
    import torch

    n = size or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up (library init, kernel selection)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            times.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    return {"size": n, "best_flops_per_s": flops / min(times), "median_flops_per_s": flops / percentile(times, 50)}
