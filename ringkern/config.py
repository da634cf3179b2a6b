"""RingConfig: every hyper-parameter of a Ring/Ling 2.0 ("BailingMoeV2") model.

Field names are those of the published ``config.json`` so a checkpoint's config
round-trips unchanged. ``RingConfig.from_preset`` gives the published shapes and
a ``tiny`` model that trains on two CPU cores.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "bailing_moe"
ARCHITECTURE = "BailingMoeV2ForCausalLM"


@dataclass
class RingConfig:
    vocab_size: int = 157184
    hidden_size: int = 4096
    intermediate_size: int = 9216  # dense (leading) layers
    moe_intermediate_size: int = 1024  # every routed expert and the shared expert
    num_hidden_layers: int = 32
    first_k_dense_replace: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    norm_topk_prob: bool = True
    use_qk_norm: bool = True
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    hidden_act: str = "silu"
    use_bias: bool = False
    use_qkv_bias: bool = False
    use_rmsnorm: bool = True
    initializer_range: float = 0.02
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    bos_token_id: int = 156891
    eos_token_id: int = 156892
    pad_token_id: int = 156892
    torch_dtype: str = "bfloat16"
    # Keys of a published config that ringkern does not interpret, kept for the round trip.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"RingConfig.{name}={getattr(self, name)!r}: expected {expected}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_experts", "num_experts_per_tok", "n_group", "topk_group"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive int")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"0..num_hidden_layers ({self.num_hidden_layers})")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"a multiple of num_key_value_heads ({self.num_key_value_heads})")
        need(self.num_experts % self.n_group == 0, "num_experts", f"divisible by n_group ({self.n_group})")
        need(self.topk_group <= self.n_group, "topk_group", f"<= n_group ({self.n_group})")
        per_group = self.num_experts // self.n_group
        need(per_group >= 2, "n_group", "at most num_experts/2 groups (group score sums each group's top-2)")
        need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
             f"<= experts in the kept groups (topk_group*num_experts/n_group = {self.topk_group * per_group})")
        need(self.num_shared_experts >= 0, "num_shared_experts", ">= 0")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor", "in (0, 1]")
        need(int(self.head_dim * self.partial_rotary_factor) % 2 == 0, "partial_rotary_factor",
             "head_dim*partial_rotary_factor even")
        need(self.score_function == "sigmoid", "score_function", "'sigmoid' (the Ring 2.0 router)")
        need(self.hidden_act == "silu", "hidden_act", "'silu'")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "False (Ring 2.0 has an untied head)")
        need(not self.use_bias and not self.use_qkv_bias, "use_bias", "False (no linear biases)")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", ">= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "> 0")
        need(self.rope_theta > 0, "rope_theta", "> 0")
        scaling = self.rope_scaling or {}
        need(scaling.get("rope_type", scaling.get("type", "default")) in ("default", "yarn")
             and (not scaling or "factor" in scaling or scaling.get("type") == "default"),
             "rope_scaling", "None or {'type': 'yarn', 'factor': ..., 'original_max_position_embeddings': ...}")

    # ---------------------------------------------------------- derived sizes
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # --------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "RingConfig":
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"overrides: unknown RingConfig fields {sorted(unknown)}")
        return cls(**values)

    # ------------------------------------------------ published config.json
    def to_hf_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out["model_type"] = MODEL_TYPE
        out["architectures"] = [ARCHITECTURE]
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "RingConfig":
        if data.get("model_type") not in (MODEL_TYPE, None):
            raise ValueError(f"config.json model_type={data.get('model_type')!r}: expected {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in ("model_type", "architectures")}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "RingConfig":
        return cls.from_hf_dict(json.loads(Path(path).read_text()))


_FLASH = dict(hidden_size=4096, intermediate_size=9216, moe_intermediate_size=1024,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=4)

PRESETS: dict[str, dict[str, Any]] = {
    "ring-flash-2.0": dict(_FLASH),
    "ling-flash-2.0": dict(_FLASH, num_nextn_predict_layers=1),  # the base model carries one MTP layer
    "ling-mini-2.0": dict(hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
                          num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                 num_nextn_predict_layers=1, max_position_embeddings=2048, rope_theta=10000.0,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32"),
}
