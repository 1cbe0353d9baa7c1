"""The engine benchmark's LoRA adapters: real PEFT directories, made once by peft and cached.

Each adapter targets all seven projections with ``lora_alpha = 2 r``. peft builds it on the
base model (``get_peft_model``), its A and B weights are then filled with seeded random values
(so every delta is non-zero, about ``RELATIVE_DELTA`` of the base projection's output), and
``save_pretrained`` writes it. The set lives in ``<cache>/bench-adapters/<key>/<name>``; the key
names the base model, the seed and the ranks, so a different workload gets its own set. A set
is built in a temporary directory and renamed into place, so an interrupted build never leaves a
half-written set behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from shared.llama_shape import PROJECTIONS
from shared.model_store import cache_root

RELATIVE_DELTA = 0.2  # |scaling * x A B| relative to |x W| for a typical input
MANIFEST = "bench-adapters.json"


def adapter_set_dir(model_dir: Path, ranks: dict[str, int], seed: int) -> Path:
    """Where the adapter set for this base model, seed and name -> rank map is cached."""
    spec = json.dumps({"model": str(Path(model_dir).resolve()), "ranks": ranks, "seed": seed,
                       "relative_delta": RELATIVE_DELTA}, sort_keys=True)
    key = hashlib.sha1(spec.encode()).hexdigest()[:12]
    return cache_root() / "bench-adapters" / f"{Path(model_dir).name}-{key}"


def ensure_bench_adapters(model_dir: Path, ranks: dict[str, int], seed: int,
                          root: Path | None = None) -> dict[str, Path]:
    """Name -> PEFT adapter dir for every ``ranks`` entry, building the set on first use."""
    target = root or adapter_set_dir(model_dir, ranks, seed)
    if (target / MANIFEST).is_file():
        return {name: target / name for name in ranks}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _build(model_dir, ranks, seed, staging)
        (staging / MANIFEST).write_text(json.dumps({"model": str(model_dir), "ranks": ranks, "seed": seed}))
        try:
            staging.rename(target)
        except OSError:  # another process finished the same set first
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: target / name for name in ranks}


def _build(model_dir: Path, ranks: dict[str, int], seed: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for i, (name, rank) in enumerate(ranks.items()):
        print(f"[bench] building adapter {i + 1}/{len(ranks)}: {name} (rank {rank})", file=sys.stderr, flush=True)
        _save_adapter(base, out / name, rank, seed * 1000 + i)


def _save_adapter(base, out_dir: Path, rank: int, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=list(PROJECTIONS),
                        init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(copy.deepcopy(base), config)
        fill_random(model, seed)
        model.save_pretrained(str(out_dir))


def fill_random(peft_model, seed: int, adapter_name: str = "default") -> None:
    """Seeded A ~ N(0, 1/in), B sized so the scaled delta is ~RELATIVE_DELTA of the base output."""
    import torch
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            rank, fan_in = a.shape
            gain = float(module.get_base_layer().weight.std()) * math.sqrt(fan_in) * RELATIVE_DELTA
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(fan_in))
            b.copy_(torch.randn(b.shape, generator=gen) * gain / (math.sqrt(rank) * module.scaling[adapter_name]))
