"""RingConfig: presets, validation messages, published config.json keys, parameter counts on meta."""
import pytest
import torch

from ringkern import PRESETS, RingConfig, RingFlashModel
from ringkern.model import count_parameters


def test_presets_build_and_match_spec():
    flash = RingConfig.from_preset("ring-flash-2.0")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.num_experts, flash.num_experts_per_tok) == (4096, 32, 256, 8)
    assert (flash.n_group, flash.topk_group, flash.routed_scaling_factor, flash.rotary_dim) == (8, 4, 2.5, 64)
    assert RingConfig.from_preset("ling-flash-2.0").num_nextn_predict_layers == 1
    mini = RingConfig.from_preset("ling-mini-2.0")
    assert (mini.hidden_size, mini.moe_intermediate_size, mini.num_hidden_layers) == (2048, 512, 20)
    tiny = RingConfig.from_preset("tiny", vocab_size=300)
    assert tiny.vocab_size == 300 and tiny.num_nextn_predict_layers == 1
    assert set(PRESETS) == {"ring-flash-2.0", "ling-flash-2.0", "ling-mini-2.0", "tiny"}


@pytest.mark.parametrize("overrides, field", [
    (dict(num_experts=15), "num_experts"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_key_value_heads=3), "num_attention_heads"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(score_function="softmax"), "score_function"),
    (dict(n_group=16), "n_group"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"RingConfig\.{field}="):
        RingConfig.from_preset("tiny", **overrides)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="preset="):
        RingConfig.from_preset("ring-huge")
    with pytest.raises(ValueError, match="unknown RingConfig fields"):
        RingConfig.from_preset("tiny", hidden_sise=3)


def test_hf_dict_round_trip_keeps_published_keys():
    cfg = RingConfig.from_preset("ring-flash-2.0")
    d = cfg.to_hf_dict()
    assert d["model_type"] == "bailing_moe" and d["architectures"] == ["BailingMoeV2ForCausalLM"]
    d["some_future_key"] = 7
    back = RingConfig.from_hf_dict(d)
    assert back == cfg.__class__(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "extra"},
                                    "extra": {"some_future_key": 7}})
    assert back.to_hf_dict()["some_future_key"] == 7
    with pytest.raises(ValueError, match="model_type"):
        RingConfig.from_hf_dict({"model_type": "llama"})


def _expected_params(c: RingConfig) -> int:
    """The arithmetic of SPEC.md section 1 (MTP layers excluded)."""
    H, V, D = c.hidden_size, c.vocab_size, c.head_dim
    attn = (c.num_attention_heads + 2 * c.num_key_value_heads) * D * H + c.num_attention_heads * D * H + 2 * D
    norms = 2 * H
    dense_mlp = 3 * H * c.intermediate_size
    moe = (c.num_experts + c.num_shared_experts) * 3 * H * c.moe_intermediate_size + c.num_experts * H
    L, k = c.num_hidden_layers, c.first_k_dense_replace
    return 2 * V * H + H + L * (attn + norms) + k * dense_mlp + (L - k) * moe


def test_flash_parameter_count_on_meta_is_exact():
    with torch.device("meta"):
        model = RingFlashModel(RingConfig.from_preset("ring-flash-2.0"))
    assert count_parameters(model) == 102_889_697_280 == _expected_params(model.config)
    assert all(p.is_meta for p in model.parameters())


def test_mini_and_mtp_parameter_counts_follow_the_same_arithmetic():
    with torch.device("meta"):
        mini = RingFlashModel(RingConfig.from_preset("ling-mini-2.0"))
        base = RingFlashModel(RingConfig.from_preset("ling-flash-2.0"))
    assert count_parameters(mini) == _expected_params(mini.config) == 16_255_638_528
    c = base.config
    mtp_layer = (_expected_params(RingConfig.from_preset("ring-flash-2.0", num_hidden_layers=2))
                 - _expected_params(RingConfig.from_preset("ring-flash-2.0", num_hidden_layers=1))
                 + 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + c.hidden_size)  # enorm/hnorm, eh_proj, final norm
    assert count_parameters(base) == 102_889_697_280 + mtp_layer
    assert abs(count_parameters(base) / 1e9 - 106.2) < 0.1
