"""Seeded random LoRA adapters written as real PEFT directories (demos, benchmarks).

``adapter_config.json`` carries the fields PEFT writes for a LoRA adapter, and
``adapter_model.safetensors`` holds PEFT's tensor names
(``base_model.model.<module>.lora_A.weight: [r, in]``, ``lora_B.weight: [out, r]``) in bf16.
A ~ N(0, 1/in) and B ~ N(0, b_std^2): the adapters cost what trained adapters of that rank
cost and change outputs mildly. Nothing here needs peft itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.llama_shape import LlamaShape


def adapter_config(rank: int, alpha: float, targets: tuple[str, ...], base_model: str) -> dict:
    """The ``adapter_config.json`` of a plain LoRA adapter."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": base_model, "inference_mode": True}


def write_adapter(out_dir: Path, shape: LlamaShape, rank: int, targets: tuple[str, ...], seed: int,
                  base_model: str, alpha: float | None = None, b_std: float = 0.002) -> Path:
    """Write one random rank-``rank`` adapter on ``targets`` of every layer into ``out_dir``."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for proj in targets:
            fan_in, fan_out = shape.proj_dims(proj)
            prefix = f"base_model.model.{shape.module_name(layer, proj)}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * b_std).bfloat16()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = adapter_config(rank, alpha if alpha is not None else 2 * rank, targets, base_model)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
