"""Reading and validating PEFT LoRA adapter directories.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(as written by ``PeftModel.save_pretrained``). :func:`load_adapter` returns a
:class:`LoraAdapter` whose weights are laid out for our kernels:

* ``A``: ``[in_features, r]`` (PEFT stores ``lora_A.weight`` as ``[r, in]``)
* ``B``: ``[r, out_features]`` with the scaling folded in: ``alpha / r``, or
  ``alpha / sqrt(r)`` for rsLoRA, where ``r`` and ``alpha`` are the module's own
  values after ``rank_pattern`` / ``alpha_pattern``.

so that ``delta(x) = x @ A @ B`` for ``x: [tokens, in_features]``.

Every way an adapter can be unusable raises :class:`AdapterError` whose message is one
line naming the adapter and the reason.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.llama_shape import PROJECTIONS, LlamaShape

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>[a-z_]+)$")


class AdapterError(ValueError):
    """An adapter cannot be served; ``str(err)`` is one line naming adapter and reason."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter '{name}': {reason}")
        self.adapter = name
        self.reason = reason


@dataclass
class LoraAdapter:
    """A validated adapter with kernel-ready weights (see module docstring for layouts)."""

    name: str
    path: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A, B)
    base_model: str | None = None
    use_rslora: bool = False
    target_projections: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank over the adapter's modules (what batching pads to)."""
        return max(a.shape[1] for a, _ in self.weights.values())

    def module_rank(self, layer: int, proj: str) -> int:
        pair = self.weights.get((layer, proj))
        return 0 if pair is None else int(pair[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "LoraAdapter":
        """A copy with every weight on ``device`` in ``dtype``."""
        moved = {k: (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())
                 for k, (a, b) in self.weights.items()}
        return LoraAdapter(self.name, self.path, moved, self.base_model, self.use_rslora,
                           self.target_projections, self.config)


def read_adapter_config(name: str, path: Path) -> dict:
    """Parse ``adapter_config.json`` or raise AdapterError."""
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(name, f"directory not found: {path}")
    if not cfg_path.is_file():
        raise AdapterError(name, f"missing {CONFIG_FILE} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(name, f"corrupt {CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(name, f"{CONFIG_FILE} is not a JSON object")
    return cfg


def check_supported(name: str, cfg: dict, max_rank: int) -> None:
    """Reject configurations we cannot serve exactly."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {peft_type} is not LoRA")
    if cfg.get("use_dora"):
        raise AdapterError(name, "use_dora is not supported (DoRA needs the weight norm at inference)")
    if cfg.get("modules_to_save"):
        raise AdapterError(name, f"modules_to_save is not supported: {cfg['modules_to_save']}")
    if str(cfg.get("bias", "none")) != "none":
        raise AdapterError(name, f"bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(name, "fan_in_fan_out is not supported for Llama projections")
    ranks = [cfg.get("r", 8)] + list((cfg.get("rank_pattern") or {}).values())
    for r in ranks:
        if not isinstance(r, int) or r < 1:
            raise AdapterError(name, f"invalid rank {r!r}")
        if r > max_rank:
            raise AdapterError(name, f"rank {r} exceeds --max-lora-rank {max_rank}")


def _targets_module(cfg: dict, module: str, shape: LlamaShape) -> bool:
    """Does the config's target_modules / layers_to_transform select ``module``?"""
    targets = cfg.get("target_modules")
    proj = module.rsplit(".", 1)[-1]
    if targets is None:
        return False
    if isinstance(targets, str):
        selected = proj in PROJECTIONS if targets == "all-linear" else re.fullmatch(targets, module) is not None
    else:
        selected = module in targets or any(module.endswith("." + t) or t == "all-linear" for t in targets)
    if selected and not isinstance(targets, str):
        layers = cfg.get("layers_to_transform")
        if layers is not None and layers != []:
            wanted = {layers} if isinstance(layers, int) else set(layers)
            selected = int(module.split(".")[2]) in wanted
    return selected


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: first key matching a module suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(name, f"missing {WEIGHTS_FILE} in {path}")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(name, f"corrupt {WEIGHTS_FILE}: {str(exc).splitlines()[0]}") from None


def _group_pairs(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group raw tensors into {module: {"A": t, "B": t}}, rejecting non-projection LoRA."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key:
            raise AdapterError(name, "LoRA on embeddings is not supported")
        if "lm_head" in key:
            raise AdapterError(name, "LoRA on lm_head is not supported")
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterError(name, f"unexpected tensor {key}")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    return pairs


def _module_weights(name: str, cfg: dict, module: str, ab: dict[str, torch.Tensor], shape: LlamaShape
                    ) -> tuple[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Validate one module's (lora_A, lora_B) and return its kernel-ready (A, B)."""
    m = _LAYER_RE.match(module)
    if m is None or m["proj"] not in PROJECTIONS or int(m["layer"]) >= shape.num_layers:
        raise AdapterError(name, f"module {module} does not exist in the base model")
    if set(ab) != {"A", "B"}:
        raise AdapterError(name, f"module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
    layer, proj = int(m["layer"]), m["proj"]
    a, b = ab["A"].float(), ab["B"].float()
    fan_in, fan_out = shape.proj_dims(proj)
    r = int(_pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)))
    if a.shape != (r, fan_in) or b.shape != (fan_out, r):
        raise AdapterError(name, f"{module}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not match "
                                 f"the base model (expected A({r}, {fan_in}) B({fan_out}, {r}))")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(name, f"{module}: NaN or Inf weights")
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return (layer, proj), (a.t().contiguous(), (b.t() * scale).contiguous())


def load_adapter(name: str, path: str | Path, shape: LlamaShape, max_rank: int = 64,
                 base_model: str | None = None) -> LoraAdapter:
    """Load and validate the PEFT adapter at ``path`` for a model of ``shape``.

    Weights are float32 on CPU; call :meth:`LoraAdapter.to` to place them.
    Raises AdapterError for every unsupported or damaged adapter.
    """
    path = Path(path)
    cfg = read_adapter_config(name, path)
    check_supported(name, cfg, max_rank)
    pairs = _group_pairs(name, _read_tensors(name, path))
    if not pairs:
        raise AdapterError(name, "no LoRA weights found")
    weights = dict(_module_weights(name, cfg, module, ab, shape) for module, ab in pairs.items())
    expected = {shape.module_name(layer, p) for layer in range(shape.num_layers) for p in PROJECTIONS
                if _targets_module(cfg, shape.module_name(layer, p), shape)}
    present = {shape.module_name(layer, p) for layer, p in weights}
    if expected and present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        detail = f"missing weights for {missing[0]}" if missing else f"weights for untargeted {extra[0]}"
        raise AdapterError(name, f"weights do not match target_modules: {detail}")
    declared_base = cfg.get("base_model_name_or_path")
    if base_model and declared_base and Path(str(declared_base)).name != Path(base_model).name:
        log.warning("adapter '%s' was trained for base model %s, serving it on %s", name, declared_base, base_model)
    projections = tuple(p for p in PROJECTIONS if any(k[1] == p for k in weights))
    return LoraAdapter(name, str(path), weights, declared_base, bool(cfg.get("use_rslora")), projections, cfg)
