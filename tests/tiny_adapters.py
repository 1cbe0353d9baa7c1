"""PEFT adapters for the tiny Llama, made by peft itself (see tests/conftest.py).

LoRA weights are overwritten with seeded random values sized so that each adapted projection
moves by about ``LORA_RELATIVE_SIZE`` of the base projection's output, after scaling: a wrong
``alpha/r`` (or ``alpha/sqrt(r)``) visibly changes the logits. Bad adapters are either made by peft
with an unsupported option or derived from a valid adapter by damaging its files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from shared.tiny_models import load_tiny_base, tiny_llama_config

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RELATIVE_SIZE = 0.5

ADAPTER_SPECS: dict[str, dict] = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all7_r16": dict(r=16, lora_alpha=16, target_modules=ALL_PROJECTIONS),
    "alllinear_r32": dict(r=32, lora_alpha=64, target_modules="all-linear", lora_dropout=0.05),
    "regex_r64": dict(r=64, lora_alpha=32, target_modules=r".*\.(q_proj|o_proj)"),
    "rslora_r16": dict(r=16, lora_alpha=8, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "pattern_r8": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={"down_proj": 16, "model.layers.1.self_attn.q_proj": 4},
                       alpha_pattern={"down_proj": 64, "v_proj": 2}),
    "layers_r16": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                       layers_to_transform=[0, 2], layers_pattern="layers"),
}

BAD_PEFT_SPECS: dict[str, dict] = {
    "dora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
    "modules_to_save": dict(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora_embed_tokens": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    "lora_lm_head": dict(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj"]),
    "bias": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], bias="lora_only"),
    "rank_too_high": dict(r=128, lora_alpha=128, target_modules=["q_proj", "v_proj"]),
}
MISMATCHED_BASE_NAME = "HuggingFaceTB/SmolLM2-360M-Instruct"


def randomize_lora(peft_model, seed: int, adapter_name: str = "default") -> None:
    """Overwrite every linear LoRA A/B pair with seeded values (|scaling*B*A*x| ~ 0.5 |W*x|)."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            a = module.lora_A[adapter_name].weight
            b = module.lora_B[adapter_name].weight
            base = module.get_base_layer().weight
            rank, fan_in = a.shape
            gain = float(base.std()) * math.sqrt(fan_in) * LORA_RELATIVE_SIZE / module.scaling[adapter_name]
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(fan_in))
            b.copy_(torch.randn(b.shape, generator=gen) / math.sqrt(rank) * gain)


def make_lora_adapter(base, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter (made by peft on a copy of ``base``) with random non-zero weights."""
    from peft import LoraConfig, get_peft_model

    with _quiet_peft():
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
        randomize_lora(peft_model, seed)
        peft_model.save_pretrained(str(out_dir))
    return out_dir


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence peft/transformers deprecation chatter (and the embedding-layer notice) while building."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)
        yield


def edit_adapter_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _corrupt_tensor(adapter_dir: Path, key_part: str, value: float) -> None:
    """Set element [0, 0] of the first tensor whose name contains ``key_part`` to ``value``."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if key_part in k)
    tensors[name][0, 0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _shape_mismatch_adapter(tiny_model_dir: Path, out_dir: Path) -> Path:
    """A peft adapter made on a base with intermediate_size 96 (ours has 128), claiming our base."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(7)
        other = LlamaForCausalLM(tiny_llama_config(intermediate_size=96)).eval()
    make_lora_adapter(other, out_dir, 7, r=8, lora_alpha=16, target_modules=["up_proj", "down_proj"])
    edit_adapter_config(out_dir, base_model_name_or_path=str(tiny_model_dir))
    return out_dir


def _ia3_adapter(base, out_dir: Path) -> Path:
    from peft import IA3Config, get_peft_model

    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    with _quiet_peft():
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(out_dir))
    return out_dir


def _valid_qv_adapter(base, out_dir: Path, seed: int) -> Path:
    return make_lora_adapter(base, out_dir, seed, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def _build_edited_adapters(base, root: Path) -> dict[str, Path]:
    """Bad adapters derived from a valid one by editing files after peft saved them."""
    bad = {kind: _valid_qv_adapter(base, root / kind, 300 + i) for i, kind in enumerate(
        ("nan", "inf", "missing_weights", "corrupt_weights", "missing_config", "invalid_config",
         "mismatched_base"))}
    _corrupt_tensor(bad["nan"], "layers.1.self_attn.v_proj.lora_B", float("nan"))
    _corrupt_tensor(bad["inf"], "layers.0.self_attn.q_proj.lora_A", float("inf"))
    (bad["missing_weights"] / "adapter_model.safetensors").unlink()
    weights = bad["corrupt_weights"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (bad["missing_config"] / "adapter_config.json").unlink()
    (bad["invalid_config"] / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    edit_adapter_config(bad["mismatched_base"], base_model_name_or_path=MISMATCHED_BASE_NAME)
    return bad



# Hostile adapters (issue 13): derived from a valid one by writing what an attacker would.
EVIL_PATTERN = "(?:.|.){27}Z"  # exponential for a backtracking engine on a ~30-character module name
HOSTILE_KINDS = ("rank_bool", "huge_int", "deep_config", "nan_weights", "sparse_claim", "redos_targets",
                 "backref_targets", "long_pattern")
SPARSE_CLAIM_BYTES = 1 << 30


def _write_config_text(adapter_dir: Path, key: str, raw_json_value: str) -> None:
    """Set ``key`` in the config to ``raw_json_value``, written verbatim (json.dumps cannot write it)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config[key] = "__RAW__"
    text = json.dumps(config).replace('"__RAW__"', raw_json_value)
    (adapter_dir / "adapter_config.json").write_text(text)


def _write_sparse_claim(adapter_dir: Path) -> None:
    """A safetensors file whose header claims a 1 GiB lora_A; the data is a hole (sparse file)."""
    import struct

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [8, SPARSE_CLAIM_BYTES // 32],
                                          "data_offsets": [0, SPARSE_CLAIM_BYTES]},
              f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [64, 8],
                                          "data_offsets": [SPARSE_CLAIM_BYTES, SPARSE_CLAIM_BYTES + 64 * 8 * 4]}}
    raw = json.dumps(header).encode()
    with (adapter_dir / "adapter_model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + SPARSE_CLAIM_BYTES + 64 * 8 * 4)


def build_hostile_adapters(valid_dir: Path, root: Path) -> dict[str, Path]:
    """kind -> adapter dir (copies of the valid adapter ``valid_dir``, one per HOSTILE_KINDS)."""
    import shutil

    bad = {kind: Path(shutil.copytree(valid_dir, root / kind)) for kind in HOSTILE_KINDS}
    edit_adapter_config(bad["rank_bool"], r=True)
    _write_config_text(bad["huge_int"], "lora_alpha", "9" * 5000)
    _write_config_text(bad["deep_config"], "loftq_config", "[" * 100_000 + "]" * 100_000)
    _corrupt_tensor(bad["nan_weights"], "layers.0.self_attn.q_proj.lora_B", float("nan"))
    _write_sparse_claim(bad["sparse_claim"])
    edit_adapter_config(bad["redos_targets"], target_modules=EVIL_PATTERN)
    edit_adapter_config(bad["backref_targets"], target_modules=r"(.*)\1")
    edit_adapter_config(bad["long_pattern"], target_modules="(?:q_proj)|" * 200 + "v_proj")
    return bad


def build_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """Every adapter of ADAPTER_SPECS, saved under ``root/<name>``."""
    base = load_tiny_base(model_dir)
    adapters = {name: make_lora_adapter(base, root / name, seed, **spec)
                for seed, (name, spec) in enumerate(ADAPTER_SPECS.items(), start=100)}
    # peft writes "all-linear" expanded to module names; keep the literal form users may write.
    edit_adapter_config(adapters["alllinear_r32"], target_modules="all-linear")
    return adapters


def build_bad_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """kind -> adapter dir, one per rejection case, plus ``mismatched_base`` (valid, warn only)."""
    base = load_tiny_base(model_dir)
    bad = {kind: make_lora_adapter(base, root / kind, 200 + i, **spec)
           for i, (kind, spec) in enumerate(BAD_PEFT_SPECS.items())}
    bad["shape_mismatch"] = _shape_mismatch_adapter(model_dir, root / "shape_mismatch")
    bad["not_lora"] = _ia3_adapter(base, root / "not_lora")
    bad.update(_build_edited_adapters(base, root))
    return bad
