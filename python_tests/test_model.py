"""RingFlashModel: forward structure, MTP, routing replay, padding, dtypes, SFT loss, expert-bias update."""
import pytest
import torch
import torch.nn.functional as F

from ringkern import RingConfig, RingFlashModel, update_expert_biases
from ringkern.model import shift_left


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return RingFlashModel(RingConfig.from_preset("tiny", vocab_size=97)).eval()


def test_padding_does_not_count_in_the_expert_load(tiny):
    """tokens_per_expert counts the real tokens only (padded rows are routed, but are not load)."""
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    out = tiny(ids, attention_mask=mask)
    for layer, counts in out.tokens_per_expert.items():
        real = out.expert_ids[layer][mask].reshape(-1).long()
        assert torch.equal(counts.long(), torch.bincount(real, minlength=tiny.config.num_experts)), layer
        assert int(counts.sum()) == (9 + 4) * tiny.config.num_experts_per_tok


def test_load_mask_picks_the_tokens_that_count(tiny):
    """load_mask overrides the attention mask for the expert load only: the same outputs, other counts."""
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    load = mask.clone()
    load[0] = False  # e.g. a data-parallel rank's stand-in sequence
    out, ref = tiny(ids, attention_mask=mask, load_mask=load), tiny(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    for layer, counts in out.tokens_per_expert.items():
        counted = out.expert_ids[layer][load].reshape(-1).long()
        assert torch.equal(counts.long(), torch.bincount(counted, minlength=tiny.config.num_experts)), layer
    none = tiny(ids, attention_mask=mask, load_mask=torch.zeros_like(mask))
    assert all(int(c.sum()) == 0 for c in none.tokens_per_expert.values())


def test_forward_outputs(tiny):
    ids = torch.randint(0, 97, (2, 11))
    out = tiny(ids)
    cfg = tiny.config
    assert out.logits.shape == (2, 11, 97) and out.hidden_states.shape == (2, 11, cfg.hidden_size)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 11, 97)
    moe_layers = [i for i in range(cfg.num_layers_with_mtp) if i >= cfg.first_k_dense_replace]
    assert sorted(out.expert_ids) == moe_layers
    assert all(v.shape == (2, 11, cfg.num_experts_per_tok) and v.dtype == torch.int32 for v in out.expert_ids.values())
    assert all(int(c.sum()) == 2 * 11 * cfg.num_experts_per_tok for c in out.tokens_per_expert.values())
    torch.testing.assert_close(out.logits, tiny.lm_head(out.hidden_states))
    skipped = tiny(ids, compute_logits=False)
    assert skipped.logits is None and skipped.mtp_logits == []
    torch.testing.assert_close(skipped.hidden_states, out.hidden_states)


def test_state_dict_names_are_published_except_stacked_experts(tiny):
    names = set(tiny.state_dict())
    for n in ("model.word_embeddings.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.attention.query_key_value.weight", "model.layers.0.attention.query_layernorm.weight",
              "model.layers.0.attention.key_layernorm.weight", "model.layers.0.attention.dense.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.shared_experts.up_proj.weight",
              "model.layers.1.mlp.experts.gate_up_proj", "model.layers.4.eh_proj.weight",
              "model.layers.4.enorm.weight", "model.layers.4.hnorm.weight", "model.layers.4.final_layernorm.weight"):
        assert n in names, n
    assert "model.layers.1.mlp.gate.expert_bias" not in dict(tiny.named_parameters())  # a buffer


def test_causality(tiny):
    ids = torch.randint(0, 97, (1, 10))
    ids2 = ids.clone()
    ids2[0, 7:] = (ids2[0, 7:] + 1) % 97
    a, b = tiny(ids, compute_mtp=False).logits, tiny(ids2, compute_mtp=False).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_mtp_logits_equal_unfused_composition(tiny):
    ids = torch.randint(0, 97, (2, 9))
    out = tiny(ids)
    mtp = tiny.mtp_layers[0]
    h = out.hidden_states
    e = tiny.model.word_embeddings(shift_left(ids, 1))  # token t+1 at position t, last position id 0
    z = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(h)], -1))
    pos = torch.arange(9).expand(2, 9)
    cos, sin = tiny.rope(pos)
    z = z + mtp.attention(mtp.input_layernorm(z), cos, sin, None)
    y, _ = mtp.mlp(mtp.post_attention_layernorm(z))
    expected = tiny.lm_head(mtp.final_layernorm(z + y))
    torch.testing.assert_close(out.mtp_logits[0], expected)
    assert torch.equal(shift_left(ids, 1)[:, -1], torch.zeros(2, dtype=ids.dtype))


def test_routing_replay(tiny):
    ids = torch.randint(0, 97, (2, 8))
    out = tiny(ids)
    replayed = tiny(ids, expert_ids=out.expert_ids)
    torch.testing.assert_close(replayed.logits, out.logits)
    forced = {k: torch.zeros_like(v) + torch.arange(v.shape[-1], dtype=v.dtype) for k, v in out.expert_ids.items()}
    other = tiny(ids, expert_ids=forced)
    assert all(torch.equal(other.expert_ids[k], forced[k]) for k in forced)
    assert not torch.allclose(other.logits, out.logits)


def test_left_padding_matches_unpadded(tiny):
    a = torch.randint(3, 97, (1, 6))
    padded = torch.cat([torch.full((1, 3), 2), a], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    ref = tiny(a, compute_mtp=False).logits
    got = tiny(padded, attention_mask=mask, compute_mtp=False).logits
    torch.testing.assert_close(got[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_bf16_matches_fp32_with_replayed_routing():
    torch.manual_seed(1)
    model = RingFlashModel(RingConfig.from_preset("tiny", vocab_size=97))
    ids = torch.randint(0, 97, (2, 12))
    ref = model(ids)
    bf16 = RingFlashModel(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    assert all(r.expert_bias.dtype == torch.float32 for r in bf16.routers().values())
    got = bf16(ids, expert_ids=ref.expert_ids)
    assert got.logits.dtype == torch.bfloat16
    rel = (got.logits.float() - ref.logits).norm() / ref.logits.norm()
    assert rel < 2e-2, rel
    # and routing chosen in bf16 agrees with fp32 for the vast majority of choices
    free = bf16(ids)
    agree = torch.cat([(free.expert_ids[k] == ref.expert_ids[k]).flatten() for k in ref.expert_ids]).float().mean()
    assert agree > 0.9


def test_expert_bias_stays_fp32_and_exact_under_casts():
    model = RingFlashModel(RingConfig.from_preset("tiny", vocab_size=97))
    bias = model.routers()[1].expert_bias
    bias.copy_(torch.linspace(-1, 1, bias.numel()) * (1 + 2**-20))
    before = bias.clone()
    model.to(torch.bfloat16).half().to(torch.float32)
    assert torch.equal(model.routers()[1].expert_bias, before)


def test_sft_loss_composition(tiny):
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    loss, parts = tiny.sft_loss(ids, labels)
    out = tiny(ids)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    mtp = F.cross_entropy(out.mtp_logits[0][:, :-2].reshape(-1, 97), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(parts["lm_loss"], lm)
    torch.testing.assert_close(parts["mtp_loss_1"], mtp)
    torch.testing.assert_close(loss, lm + tiny.config.mtp_loss_scaling_factor * mtp)


def test_training_step_reduces_loss_and_updates_biases():
    torch.manual_seed(0)
    model = RingFlashModel(RingConfig.from_preset("tiny", vocab_size=97))
    ids = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss, parts = model.sft_loss(ids, ids)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert model.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
        assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # through the routing weights
        opt.step()
        metrics = update_expert_biases(model, parts["tokens_per_expert"])
    assert loss.item() < first * 0.9
    assert metrics["max_load_ratio"] >= 1.0 and 0 <= metrics["dead_expert_frac"] <= 1
    assert any(r.expert_bias.abs().sum() > 0 for r in model.routers().values())


def test_dense_model_compiles_fullgraph():
    cfg = RingConfig.from_preset("tiny", vocab_size=97, num_hidden_layers=2, first_k_dense_replace=2,
                                 num_nextn_predict_layers=0)
    model = RingFlashModel(cfg)
    ids = torch.randint(0, 97, (1, 8))
    compiled = torch.compile(lambda x: model(x).logits, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), model(ids).logits)
