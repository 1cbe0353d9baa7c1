"""Seeded random LoRA adapters written as PEFT directories, for benchmarks.

Each adapter is a real PEFT directory: ``adapter_config.json`` written by peft's own
``LoraConfig.save_pretrained`` and ``adapter_model.safetensors`` with PEFT's tensor names
(``base_model.model.<module>.lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``),
in bf16. Weights are random (A ~ N(0, 1/in), B ~ N(0, std^2)): they cost what real
adapters of that rank cost, and they change outputs mildly. A set is generated once into
the user cache (keyed by model, rank, targets, count and seed) and reused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from shared.llama_shape import LlamaShape
from shared.model_store import cache_root

log = logging.getLogger(__name__)

DONE_MARKER = ".complete.json"


def adapter_names(count: int) -> list[str]:
    return [f"lora-{i:04d}" for i in range(count)]


def write_adapter(out_dir: Path, shape: LlamaShape, rank: int, targets: tuple[str, ...], seed: int,
                  base_model: str, b_std: float = 0.002) -> None:
    """One random PEFT LoRA adapter of ``rank`` on ``targets`` (every layer) in ``out_dir``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for proj in targets:
            fan_in, fan_out = shape.proj_dims(proj)
            prefix = f"base_model.model.{shape.module_name(layer, proj)}"
            a = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=gen) * b_std
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM",
               base_model_name_or_path=base_model).save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def ensure_adapters(model_dir: Path, count: int, rank: int, targets: tuple[str, ...], seed: int,
                    progress=None) -> Path:
    """The directory holding ``count`` random adapters for ``model_dir`` (generated on first use)."""
    shape = LlamaShape.from_model_dir(model_dir)
    key = f"{Path(model_dir).name}-r{rank}-{'_'.join(targets)}-n{count}-s{seed}"
    root = cache_root() / "cold-start-adapters" / key
    spec = {"model": Path(model_dir).name, "count": count, "rank": rank, "targets": list(targets), "seed": seed}
    marker = root / DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    log.info("generating %d random rank-%d adapters in %s", count, rank, root)
    for i, name in enumerate(adapter_names(count)):
        write_adapter(root / name, shape, rank, targets, seed * 100_003 + i, Path(model_dir).name)
        if progress is not None:
            progress(i + 1, count)
    marker.write_text(json.dumps(spec))
    return root
