"""The shapes of a Llama-family model that adapters and kernels must agree with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The LoRA-targetable linear projections of one decoder layer, in execution order."""

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

INPUT_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                            "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
"""Projections of one decoder layer that share one input, in execution order."""


@dataclass(frozen=True)
class LlamaShape:
    """Layer count and projection sizes of a Llama-architecture model."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaShape":
        """Read the shape from an HF ``config.json`` dict."""
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "LlamaShape":
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def proj_dims(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of projection ``proj``."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden_size, q),
            "k_proj": (self.hidden_size, kv),
            "v_proj": (self.hidden_size, kv),
            "o_proj": (q, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return dims[proj]

    def module_name(self, layer: int, proj: str) -> str:
        """The HF module path of a projection, e.g. ``model.layers.3.self_attn.q_proj``."""
        block = "self_attn" if proj in ATTN_PROJECTIONS else "mlp"
        return f"model.layers.{layer}.{block}.{proj}"
