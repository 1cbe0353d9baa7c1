"""Our compact Llama forward: RMSNorm, RoPE (with Llama-3 scaling), GQA, SwiGLU.

It loads any local HF Llama-architecture directory (config.json + *.safetensors) and runs
a flattened batch of tokens from many requests. Every LoRA-targetable projection is
computed as ``y = x @ W.T + lora(x)``, where ``lora`` comes from the step's
:class:`~services.gpu_worker.lora_plan.LoraHooks`. q/k/v and gate/up share their input,
so their base weights are fused into one GEMM each; LoRA deltas land in column slices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from services.gpu_worker.attention import StepAttention
from services.gpu_worker.dense import DenseWeight
from services.gpu_worker.layer_ops import add_rms_norm_, rms_norm, silu_mul
from services.gpu_worker.lora_plan import LoraHooks
from services.gpu_worker.rope import RotaryEmbedding
from shared.llama_shape import LlamaShape


class ModelLoadError(ValueError):
    """The model directory is missing, incomplete or not a Llama-architecture model."""


@dataclass(frozen=True)
class ModelConfig:
    """The parts of an HF Llama ``config.json`` the forward needs."""

    shape: LlamaShape
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
            raise ModelLoadError(f"{model_dir} is a {cfg.get('model_type')} model, not Llama")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ModelLoadError(f"{model_dir}: attention_bias/mlp_bias are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{model_dir}: hidden_act {cfg.get('hidden_act')} is not supported")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        params = cfg.get("rope_parameters") or {}
        return cls(
            shape=LlamaShape.from_config(cfg),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", params.get("rope_theta", 10000.0))),
            rope_scaling=cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            name=str(cfg.get("_name_or_path") or Path(model_dir).name),
            extra=cfg,
        )


@dataclass
class LayerWeights:
    """One decoder layer, base weights in ``[out, in]`` layout with q|k|v and gate|up fused."""

    input_norm: torch.Tensor
    qkv: DenseWeight  # [q + 2 kv, hidden]
    o: DenseWeight  # [hidden, q]
    post_norm: torch.Tensor
    gate_up: DenseWeight  # [2 I, hidden]
    down: DenseWeight  # [hidden, I]


def _load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read {f}: {str(exc).splitlines()[0]}") from None
    return tensors


class LlamaModel:
    """The base model on one device. Call :meth:`forward` then :meth:`logits`."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: str) -> None:
        model_dir = Path(model_dir)
        self.config = ModelConfig.from_dir(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        raw = _load_tensors(model_dir)
        self.embed = self._take(raw, "model.embed_tokens.weight")
        self.norm = self._take(raw, "model.norm.weight")
        self.lm_head = DenseWeight(self.embed if self.config.tie_word_embeddings else self._take(raw, "lm_head.weight"))
        self.layers = [self._layer(raw, i) for i in range(self.config.shape.num_layers)]
        s = self.config.shape
        self.q_size, self.kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.rope = RotaryEmbedding(s.head_dim, self.config.max_position_embeddings, self.config.rope_theta,
                                    self.config.rope_scaling, dtype, device)

    def _take(self, raw: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in raw:
            raise ModelLoadError(f"weight {key} is missing")
        return raw.pop(key).to(device=self.device, dtype=self.dtype).contiguous()

    def _layer(self, raw: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        t = lambda name: self._take(raw, p + name)  # noqa: E731
        return LayerWeights(
            input_norm=t("input_layernorm.weight"),
            qkv=DenseWeight(torch.cat([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"),
                                       t("self_attn.v_proj.weight")])),
            o=DenseWeight(t("self_attn.o_proj.weight")),
            post_norm=t("post_attention_layernorm.weight"),
            gate_up=DenseWeight(torch.cat([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")])),
            down=DenseWeight(t("mlp.down_proj.weight")),
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.embed, self.norm] + [t for layer in self.layers for t in (layer.input_norm, layer.post_norm)]
        dense = [d for layer in self.layers for d in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        own_head = self.lm_head.packed or not self.config.tie_word_embeddings  # else it is the embedding
        return sum(t.numel() * t.element_size() for t in tensors) + sum(d.nbytes for d in dense) \
            + (self.lm_head.nbytes if own_head else 0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepAttention,
                kv: list[tuple[torch.Tensor, torch.Tensor]], lora: LoraHooks | None) -> torch.Tensor:
        """Run all layers. ``input_ids``/``positions``: ``[T]``; returns final hidden ``[T, hidden]``.

        ``x`` is the residual stream; each block's output is added to it in place, fused with the
        next RMSNorm (the following block's, or the final norm after the last layer).
        """
        eps = self.config.rms_norm_eps
        x = F.embedding(input_ids, self.embed)
        h = rms_norm(x, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            h = add_rms_norm_(x, self._attention_block(i, layer, h, positions, meta, kv[i], lora), layer.post_norm, eps)
            after = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h = add_rms_norm_(x, self._mlp_block(i, layer, h, lora), after, eps)
        return h

    def _attention_block(self, i: int, layer: LayerWeights, h: torch.Tensor, positions: torch.Tensor,
                         meta: StepAttention, kv: tuple[torch.Tensor, torch.Tensor], lora: LoraHooks | None
                         ) -> torch.Tensor:
        """Self-attention of the normalised ``h: [T, hidden]`` -> ``[T, hidden]``."""
        s = self.config.shape
        if lora:
            lora.begin(i, "qkv", h)
        qkv = layer.qkv(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if lora:
            lora.apply(i, "qkv", h, (q, k, v))
        q, k = self.rope.apply(q.view(-1, s.num_heads, s.head_dim), k.view(-1, s.num_kv_heads, s.head_dim), positions)
        attn = meta.attend(q, k, v.view(-1, s.num_kv_heads, s.head_dim), kv[0], kv[1])
        if lora:
            lora.begin(i, "o", attn)
        out = layer.o(attn)
        if lora:
            lora.apply(i, "o", attn, (out,))
        return out

    def _mlp_block(self, i: int, layer: LayerWeights, h: torch.Tensor, lora: LoraHooks | None) -> torch.Tensor:
        """SwiGLU MLP of the normalised ``h: [T, hidden]`` -> ``[T, hidden]``."""
        if lora:
            lora.begin(i, "gate_up", h)
        gate_up = layer.gate_up(h)
        if lora:
            lora.apply(i, "gate_up", h, gate_up.chunk(2, dim=-1))
        act = silu_mul(gate_up)
        if lora:
            lora.begin(i, "down", act)
        out = layer.down(act)
        if lora:
            lora.apply(i, "down", act, (out,))
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [N, hidden]`` -> float32 logits ``[N, vocab]``."""
        return self.lm_head(hidden).float()
