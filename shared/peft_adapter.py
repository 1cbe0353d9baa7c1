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
line naming the adapter and the reason. The files are untrusted, so nothing is read
unbounded: ``adapter_config.json`` is parsed within size, depth and number bounds and its
fields type-checked (:func:`read_adapter_config`); its module regexes are compiled by RE2
(``shared.module_patterns``); and the safetensors header is checked against the file size
and the base model's LoRA shapes (:func:`check_weight_shapes`) before any weight is read.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shared.bounded_json import BoundedJsonError, loads_bounded
from shared.llama_shape import PROJECTIONS, LlamaShape
from shared.module_patterns import PatternError, compile_pattern, full_match, suffix_pattern
from shared.safetensors_header import HeaderError, TensorSpec, read_header

if TYPE_CHECKING:  # torch is imported where weights are read: the gateway reads configs only, and starts faster
    import torch

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
_MAX_KEY_CHARS = 512
_T = TypeVar("_T")
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
    """Parse ``adapter_config.json`` within bounds and type-check its fields, or raise AdapterError."""
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(name, f"directory not found: {path}")
    if not cfg_path.is_file():
        raise AdapterError(name, f"missing {CONFIG_FILE} in {path}")
    try:
        with cfg_path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        cfg = loads_bounded(raw, MAX_CONFIG_BYTES)
    except (OSError, BoundedJsonError) as exc:
        raise AdapterError(name, f"corrupt {CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(name, f"{CONFIG_FILE} is not a JSON object")
    check_config_types(name, cfg)
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)  # bounded parsing admits no NaN or inf


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _is_map_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and all(check(v) for v in value.values())


# field -> (check, what it must be). Fields PEFT may write as null are optional.
_CONFIG_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (_is_int, "an integer"),
    "lora_alpha": (_is_number, "a number"),
    "peft_type": (_optional(lambda v: isinstance(v, str)), "a string"),
    "bias": (_optional(lambda v: isinstance(v, str)), "a string"),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "a string"),
    "use_rslora": (_optional(lambda v: isinstance(v, bool)), "true or false"),
    "use_dora": (_optional(lambda v: isinstance(v, bool)), "true or false"),
    "fan_in_fan_out": (_optional(lambda v: isinstance(v, bool)), "true or false"),
    "target_modules": (_optional(lambda v: isinstance(v, str) or _is_list_of(lambda t: isinstance(t, str))(v)),
                       "a string or a list of strings"),
    "layers_to_transform": (_optional(lambda v: _is_int(v) or _is_list_of(_is_int)(v)),
                            "an integer or a list of integers"),
    "rank_pattern": (_optional(_is_map_of(_is_int)), "an object of integers"),
    "alpha_pattern": (_optional(_is_map_of(_is_number)), "an object of numbers"),
}


def check_config_types(name: str, cfg: Mapping[str, Any]) -> None:
    """Every field we read has the JSON type PEFT writes, and every module regex compiles in RE2.

    ``r: true`` is refused (a bool is not an integer), as is a pattern RE2 cannot match in
    linear time.
    """
    for key, (check, what) in _CONFIG_FIELDS.items():
        if key in cfg and not check(cfg[key]):
            raise AdapterError(name, f"{CONFIG_FILE}: {key} must be {what}, got {_brief(cfg[key])}")
    targets = cfg.get("target_modules")
    patterns = [targets] if isinstance(targets, str) and targets != "all-linear" else []
    patterns += [suffix_pattern(key) for field_ in ("rank_pattern", "alpha_pattern") for key in cfg.get(field_) or {}]
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            raise AdapterError(name, f"{CONFIG_FILE}: {exc}") from None


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def config_rank(cfg: Mapping[str, Any]) -> int:
    """The largest LoRA rank a type-checked config declares (``r`` and ``rank_pattern``)."""
    return max([cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()])


def check_supported(name: str, cfg: dict, max_rank: int) -> None:
    """Reject configurations we cannot serve exactly (``cfg`` is type-checked already)."""
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {_brief(peft_type)} is not LoRA")
    if cfg.get("use_dora"):
        raise AdapterError(name, "use_dora is not supported (DoRA needs the weight norm at inference)")
    if cfg.get("modules_to_save"):
        raise AdapterError(name, f"modules_to_save is not supported: {_brief(cfg['modules_to_save'])}")
    if str(cfg.get("bias") or "none") != "none":
        raise AdapterError(name, f"bias={_brief(cfg['bias'])} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(name, "fan_in_fan_out is not supported for Llama projections")
    ranks = [cfg.get("r", 8)] + list((cfg.get("rank_pattern") or {}).values())
    for r in ranks:
        if not _is_int(r) or r < 1:
            raise AdapterError(name, f"invalid rank {_brief(r)}")
        if r > max_rank:
            raise AdapterError(name, f"rank {r} exceeds --max-lora-rank {max_rank}")


def _targets_module(cfg: dict, module: str, shape: LlamaShape) -> bool:
    """Does the config's target_modules / layers_to_transform select ``module``?"""
    targets = cfg.get("target_modules")
    proj = module.rsplit(".", 1)[-1]
    if targets is None:
        return False
    if isinstance(targets, str):
        selected = proj in PROJECTIONS if targets == "all-linear" else full_match(targets, module)
    else:
        selected = module in targets or any(module.endswith("." + t) or t == "all-linear" for t in targets)
    if selected and not isinstance(targets, str):
        layers = cfg.get("layers_to_transform")
        if layers is not None and layers != []:
            wanted = {layers} if isinstance(layers, int) else set(layers)
            selected = int(module.split(".")[2]) in wanted
    return selected


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: first key matching a module suffix (RE2)."""
    for key, value in (patterns or {}).items():
        if full_match(suffix_pattern(key), module):
            return value
    return default


def read_weights_header(name: str, path: Path) -> dict[str, TensorSpec]:
    """The tensors ``adapter_model.safetensors`` declares, checked against its size (no data read)."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(name, f"missing {WEIGHTS_FILE} in {path}")
    try:
        return read_header(weights)
    except HeaderError as exc:
        raise AdapterError(name, f"corrupt {WEIGHTS_FILE}: {exc}") from None


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(name, f"corrupt {WEIGHTS_FILE}: {str(exc).splitlines()[0]}") from None


def _group_pairs(name: str, tensors: Mapping[str, _T]) -> dict[str, dict[str, _T]]:
    """Group tensors (or their header specs) into {module: {"A": t, "B": t}}, rejecting non-projection LoRA."""
    pairs: dict[str, dict[str, _T]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key:
            raise AdapterError(name, "LoRA on embeddings is not supported")
        if "lm_head" in key:
            raise AdapterError(name, "LoRA on lm_head is not supported")
        m = _KEY_RE.match(key) if len(key) <= _MAX_KEY_CHARS else None
        if m is None:
            raise AdapterError(name, f"unexpected tensor {_brief(key)}")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise AdapterError(name, "no LoRA weights found")
    return pairs


def _module_rank(name: str, cfg: dict, module: str, ab: Mapping[str, object], shape: LlamaShape
                 ) -> tuple[int, str, int]:
    """(layer, projection, rank) of ``module``: it must exist in the base model and have both A and B."""
    m = _LAYER_RE.match(module)
    if m is None or m["proj"] not in PROJECTIONS or int(m["layer"]) >= shape.num_layers:
        raise AdapterError(name, f"module {_brief(module)} does not exist in the base model")
    if set(ab) != {"A", "B"}:
        raise AdapterError(name, f"module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
    return int(m["layer"]), m["proj"], int(_pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)))


def _check_shapes(name: str, module: str, a: tuple[int, ...], b: tuple[int, ...], r: int, dims: tuple[int, int]
                  ) -> None:
    fan_in, fan_out = dims
    if tuple(a) != (r, fan_in) or tuple(b) != (fan_out, r):
        raise AdapterError(name, f"{module}: shapes A{tuple(a)} B{tuple(b)} do not match "
                                 f"the base model (expected A({r}, {fan_in}) B({fan_out}, {r}))")


def check_weight_shapes(name: str, cfg: dict, specs: Mapping[str, TensorSpec], shape: LlamaShape) -> None:
    """Every declared tensor has its module's LoRA shape for the base model, and the modules
    are exactly those ``target_modules`` selects.

    Runs on the header alone, so a file claiming e.g. a 1 GiB tensor is refused before any
    of its data is read.
    """
    present = set()
    for module, ab in _group_pairs(name, specs).items():
        layer, proj, r = _module_rank(name, cfg, module, ab, shape)
        _check_shapes(name, module, ab["A"].shape, ab["B"].shape, r, shape.proj_dims(proj))
        present.add(shape.module_name(layer, proj))
    expected = {shape.module_name(layer, p) for layer in range(shape.num_layers) for p in PROJECTIONS
                if _targets_module(cfg, shape.module_name(layer, p), shape)}
    if expected and present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        detail = f"missing weights for {missing[0]}" if missing else f"weights for untargeted {extra[0]}"
        raise AdapterError(name, f"weights do not match target_modules: {detail}")


def check_adapter_files(name: str, path: Path, shape: LlamaShape, max_rank: int) -> dict:
    """Everything about the adapter at ``path`` that can be checked without reading its weights:
    the config (bounded, typed, supported) and the safetensors header (size, shapes, targets).
    Returns the config; raises AdapterError."""
    cfg = read_adapter_config(name, path)
    check_supported(name, cfg, max_rank)
    check_weight_shapes(name, cfg, read_weights_header(name, path), shape)
    return cfg


def check_weights_finite(name: str, path: Path) -> None:
    """Read the weights one tensor at a time and refuse NaN or Inf values (AdapterError)."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    raise AdapterError(name, f"{_brief(key)}: NaN or Inf weights")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise AdapterError(name, f"corrupt {WEIGHTS_FILE}: {str(exc).splitlines()[0]}") from None


def validate_adapter(name: str, path: str | Path, shape: LlamaShape, max_rank: int) -> None:
    """Every check :func:`load_adapter` makes, without keeping the weights: what runtime
    registration runs, so a bad adapter is refused when it is registered, not at first use."""
    check_adapter_files(name, Path(path), shape, max_rank)
    check_weights_finite(name, Path(path))


def _module_weights(name: str, cfg: dict, module: str, ab: dict[str, torch.Tensor], shape: LlamaShape
                    ) -> tuple[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Validate one module's (lora_A, lora_B) and return its kernel-ready (A, B)."""
    import torch

    layer, proj, r = _module_rank(name, cfg, module, ab, shape)
    a, b = ab["A"].float(), ab["B"].float()
    _check_shapes(name, module, a.shape, b.shape, r, shape.proj_dims(proj))
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
    cfg = check_adapter_files(name, path, shape, max_rank)
    pairs = _group_pairs(name, _read_tensors(name, path))
    weights = dict(_module_weights(name, cfg, module, ab, shape) for module, ab in pairs.items())
    declared_base = cfg.get("base_model_name_or_path")
    if base_model and declared_base and Path(str(declared_base)).name != Path(base_model).name:
        log.warning("adapter '%s' was trained for base model %s, serving it on %s", name, declared_base, base_model)
    projections = tuple(p for p in PROJECTIONS if any(k[1] == p for k in weights))
    return LoraAdapter(name, str(path), weights, declared_base, bool(cfg.get("use_rslora")), projections, cfg)
