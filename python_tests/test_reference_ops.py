"""The pure-PyTorch references: hand-worked router, RoPE, RMSNorm, MoE experts, losses; op registration."""
import math

import pytest
import torch
import torch.nn.functional as F

from ringkern import ops


def _logit(p):
    p = torch.tensor(p, dtype=torch.float64)
    return (p.log() - (1 - p).log()).float()


ROUTE = dict(n_group=4, topk_group=2, top_k=2, routed_scaling_factor=2.5)


def test_router_hand_worked_example():
    # scores s (after sigmoid), 8 experts in 4 groups of 2; the bias lifts group 2.
    s = [0.9, 0.1, 0.05, 0.92, 0.2, 0.35, 0.8, 0.05]
    bias = torch.tensor([0, 0, 0, 0, 0.6, 0.6, 0, 0], dtype=torch.float32)
    # biased: [.9 .1 | .05 .92 | .8 .95 | .8 .05] -> group scores 1.0, .97, 1.75, .85 -> keep groups 2, 0.
    # Expert 3 (0.92) would beat expert 0 but its group is masked; top-2 = experts 5 (0.95), 0 (0.9).
    w, ids, counts = ops.moe_route(_logit(s).view(1, 8), bias, **ROUTE)
    assert ids.tolist() == [[5, 0]] and ids.dtype == torch.int32
    # weights use the unbiased scores: [0.35, 0.9] / 1.25 * 2.5
    torch.testing.assert_close(w, torch.tensor([[0.7, 1.8]]), atol=1e-6, rtol=0)
    assert counts.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    # without the bias, groups 0 and 1 win and expert 3 is chosen first
    _, ids_nobias, _ = ops.moe_route(_logit(s).view(1, 8), torch.zeros(8), **ROUTE)
    assert ids_nobias.tolist() == [[3, 0]]
    # without renormalization: the raw scores times the scaling factor
    w_raw, _, _ = ops.moe_route(_logit(s).view(1, 8), bias, renormalize=False, **ROUTE)
    torch.testing.assert_close(w_raw, torch.tensor([[0.35 * 2.5, 0.9 * 2.5]]), atol=1e-6, rtol=0)


def test_router_ties_go_to_lower_index():
    w, ids, counts = ops.moe_route(torch.zeros(3, 8), torch.zeros(8), n_group=4, topk_group=2, top_k=3,
                                   routed_scaling_factor=1.0)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))
    assert counts.tolist() == [3, 3, 3, 0, 0, 0, 0, 0]


def test_router_replay_uses_given_ids():
    logits = torch.randn(5, 16)
    given = torch.randint(0, 16, (5, 4), dtype=torch.int32)
    w, ids, counts = ops.moe_route(logits, torch.randn(16), n_group=4, topk_group=2, top_k=4,
                                   routed_scaling_factor=2.5, expert_ids=given)
    assert torch.equal(ids, given)
    s = torch.sigmoid(logits).gather(1, given.long())
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True) * 2.5)
    assert torch.equal(counts, torch.bincount(given.view(-1).long(), minlength=16).int())


def test_router_respects_group_limit_on_random_inputs():
    logits, bias = torch.randn(64, 16), torch.randn(16) * 0.1
    _, ids, counts = ops.moe_route(logits, bias, n_group=4, topk_group=2, top_k=4, routed_scaling_factor=1.0)
    groups = (ids.long() // 4)
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    assert all(len(set(row.tolist())) == 4 for row in ids)  # distinct experts
    assert counts.sum().item() == 64 * 4


def test_rope_partial_neox_rotation():
    D, rot, T = 8, 4, 5
    x = torch.randn(1, 2, T, D)
    inv_freq = ops.rope_inv_freq(rot, 10000.0)
    torch.testing.assert_close(inv_freq, torch.tensor([1.0, 10000.0 ** -0.5]))
    cos, sin = ops.rope_cos_sin(torch.arange(T).view(1, T), inv_freq)
    y = ops.apply_partial_rope(x, cos, sin)
    assert torch.equal(y[..., rot:], x[..., rot:])  # pass-through channels
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity
    # channel i pairs with i + rot/2 (rotate-half): angle = pos * inv_freq[i]
    pos, i = 3, 1
    a = pos * inv_freq[i]
    x1, x2 = x[..., pos, i], x[..., pos, i + rot // 2]
    torch.testing.assert_close(y[..., pos, i], x1 * math.cos(a) - x2 * math.sin(a))
    torch.testing.assert_close(y[..., pos, i + rot // 2], x2 * math.cos(a) + x1 * math.sin(a))


def test_rope_scores_depend_only_on_relative_position():
    inv_freq = ops.rope_inv_freq(64, 600000.0)
    q, k = torch.randn(1, 1, 1, 128), torch.randn(1, 1, 1, 128)

    def score(pq, pk):
        cq, sq = ops.rope_cos_sin(torch.tensor([[pq]]), inv_freq)
        ck, sk = ops.rope_cos_sin(torch.tensor([[pk]]), inv_freq)
        return (ops.apply_partial_rope(q, cq, sq) * ops.apply_partial_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-4, rtol=1e-4)


def test_rms_norm_reference_and_gradients():
    x = torch.randn(3, 7, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    y = ops.rms_norm(x, w, 1e-6)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    torch.testing.assert_close(y, expected)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-6), (x, w))


def test_rms_norm_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 5, 24, dtype=dtype, requires_grad=True)
        w = torch.randn(24, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.ringkern.rms_norm.default, (x, w, 1e-6))
        torch.library.opcheck(torch.ops.ringkern.rms_norm_backward.default,
                              (torch.randn_like(x), x.detach(), w.detach(), 1e-6))


def test_rms_norm_compiles_fullgraph():
    fn = torch.compile(lambda a, b: ops.rms_norm(a, b, 1e-6) * 2, fullgraph=True, backend="aot_eager")
    x, w = torch.randn(4, 16), torch.randn(16)
    torch.testing.assert_close(fn(x, w), ops.rms_norm(x, w, 1e-6) * 2)


def _naive_moe(x, weights, ids, gate_up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = gate_up[e] @ x[t]
            out[t] += weights[t, j] * (down[e] @ (F.silu(h[0::2]) * h[1::2]))  # interleaved rows
    return out


def test_gate_up_interleaving():
    """Index 2i holds gate_i and 2i + 1 up_i, along the weights' rows and the projections' columns."""
    gate, up = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    rows = ops.reference.join_gate_up(gate, up, dim=1)  # [E, 2I, H] like experts.gate_up_proj
    assert torch.equal(rows[:, 0::2], gate) and torch.equal(rows[:, 1::2], up)
    assert all(torch.equal(a, b) for a, b in zip(ops.reference.split_gate_up(rows, dim=1), (gate, up)))
    cols = ops.reference.join_gate_up(gate, up)  # [.., 2H]
    assert torch.equal(cols[..., 0::2], gate) and torch.equal(cols[..., 1::2], up)
    assert all(torch.equal(a, b) for a, b in zip(ops.reference.split_gate_up(cols), (gate, up)))


@pytest.mark.parametrize("T", [1, 7, 40])
def test_moe_experts_against_naive_loop(T):
    E, H, I, k = 6, 12, 10, 3
    x = torch.randn(T, H, dtype=torch.float64)
    gate_up, down = torch.randn(E, 2 * I, H, dtype=torch.float64), torch.randn(E, H, I, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    ids[0] = torch.tensor([0, 1, 2])  # experts 3..5 may get no token at T=1
    w = torch.rand(T, k, dtype=torch.float64)
    got = ops.moe_experts(x, w, ids, gate_up, down)
    torch.testing.assert_close(got, _naive_moe(x, w, ids, gate_up, down))


def test_moe_experts_all_tokens_to_one_expert_and_gradients():
    E, H, I = 4, 8, 6
    x = torch.randn(5, H, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E, H, I, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 1, dtype=torch.float64, requires_grad=True)
    ids = torch.full((5, 1), 2, dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b, c, d: ops.moe_experts(a, b, ids, c, d), (x, w, gate_up, down))


def test_expert_bias_update_moves_against_load():
    bias = torch.zeros(4)
    ops.expert_bias_update(bias, torch.tensor([10, 0, 5, 5]), rate=0.1)
    assert bias[0] < 0 < bias[1] and abs(bias.sum().item()) < 1e-7


def test_token_logprobs_and_entropy():
    h, W = torch.randn(9, 16, dtype=torch.float64), torch.randn(37, 16, dtype=torch.float64)
    tgt = torch.randint(0, 37, (9,))
    lp, ent = ops.token_logprobs(h, W, tgt, temperature=0.7, return_entropy=True)
    logp = torch.log_softmax(h @ W.T / 0.7, -1)
    torch.testing.assert_close(lp, logp[torch.arange(9), tgt])
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1))


def test_linear_cross_entropy_ignore_and_reductions():
    h, W = torch.randn(6, 8), torch.randn(11, 8)
    tgt = torch.tensor([1, -100, 3, 4, -100, 10])
    expected = F.cross_entropy(h @ W.T, tgt, ignore_index=-100)
    torch.testing.assert_close(ops.linear_cross_entropy(h, W, tgt), expected)
    assert ops.linear_cross_entropy(h, W, tgt, reduction="none")[1] == 0
    all_ignored = ops.linear_cross_entropy(h, W, torch.full((6,), -100))
    assert all_ignored.item() == 0.0
    with pytest.raises(ValueError, match="reduction="):
        ops.linear_cross_entropy(h, W, tgt, reduction="avg")


def _loss_inputs(T=6, V=13, H=8):
    h = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64)
    tgt = torch.randint(0, V, (T,))
    logp = ops.token_logprobs(h.detach(), W, tgt).double()
    return h, W, tgt, logp


def test_icepop_hand_computed_weights():
    h, W, tgt, logp = _loss_inputs()
    old = logp.float()
    # k = exp(old - rollout): below alpha, inside, above beta, inside, inside, inside
    log_k = torch.tensor([math.log(0.4), 0.0, math.log(6.0), math.log(2.0), 0.0, 0.0])
    rollout = old - log_k
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, 2.0, 0.5])
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    loss, m = ops.icepop_policy_loss(h, W, tgt, old, rollout, adv, mask, cu)
    # r = 1 at theta = theta_old: term = weight * A; icepop weights [0, 1, 0, 2, 1, -]
    terms = torch.tensor([0.0, 1.0, 0.0, -2.0, 2.0])
    expected = -((terms[:3].sum() / 3) + (terms[3:5].sum() / 2)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert m["masked_low_frac"].item() == pytest.approx(1 / 5)
    assert m["masked_high_frac"].item() == pytest.approx(1 / 5)
    assert m["num_tokens"].item() == 5
    loss.backward()
    assert torch.all(h.grad[[0, 2, 5]] == 0)  # masked-low, masked-high and non-loss tokens: exactly zero
    assert torch.all(h.grad[[1, 3, 4]].abs().sum(-1) > 0)

    loss_tis, _ = ops.icepop_policy_loss(h, W, tgt, old, rollout, adv, mask, cu, correction="tis",
                                         aggregation="token-mean")
    tis_terms = torch.tensor([0.4, 1.0, 2.0, -2.0, 2.0])  # min(k, 2) * A
    assert loss_tis.item() == pytest.approx(-tis_terms.sum().item() / 5, abs=1e-6)
    loss_none, _ = ops.icepop_policy_loss(h, W, tgt, old, rollout, adv, mask, cu, correction="none",
                                          aggregation="token-mean")
    assert loss_none.item() == pytest.approx(-(1 + 1 + 1 - 1 + 2.0) / 5, abs=1e-6)


def test_icepop_ppo_clipping():
    h, W, tgt, logp = _loss_inputs(T=2)
    old = (logp - torch.tensor([0.5, -0.5])).float()  # r = e^0.5 (A>0: clipped), e^-0.5 (A<0: clipped)
    adv = torch.tensor([1.0, -1.0])
    loss, m = ops.icepop_policy_loss(h, W, tgt, old, old, adv, torch.ones(2, dtype=torch.bool),
                                     torch.tensor([0, 2]), aggregation="token-mean")
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2, abs=1e-6)
    assert m["clip_frac"].item() == 1.0
    loss.backward()
    assert torch.all(h.grad == 0)  # both clipped: no gradient


def test_icepop_all_masked_gives_zero_loss_and_finite_metrics():
    h, W, tgt, logp = _loss_inputs()
    old = logp.float()
    rollout = old - math.log(100.0)  # k = 100 > beta everywhere
    for mask in (torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)):
        for agg in ops.AGGREGATIONS:
            loss, m = ops.icepop_policy_loss(h, W, tgt, old, rollout, torch.ones(6), mask,
                                             torch.tensor([0, 2, 6]), aggregation=agg)
            assert loss.item() == 0.0
            assert all(torch.isfinite(v).all() for v in m.values())
            h.grad = None
            loss.backward()
            assert torch.all(h.grad == 0)


def test_icepop_bad_mode_names_argument():
    h, W, tgt, logp = _loss_inputs()
    args = (h, W, tgt, logp.float(), logp.float(), torch.ones(6), torch.ones(6, dtype=torch.bool), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="correction="):
        ops.icepop_policy_loss(*args, correction="gspo")
    with pytest.raises(ValueError, match="aggregation="):
        ops.icepop_policy_loss(*args, aggregation="sum")


def test_attention_reference_matches_explicit_softmax_with_gqa_and_padding():
    B, Hq, Hkv, T, D = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :2] = False  # left padding
    out = ops.attention(q, k, v, causal=True, key_padding_mask=pad)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(D)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & pad.view(B, 1, 1, T)
    allowed = allowed | torch.eye(T, dtype=torch.bool)
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_yarn_rope_frequencies():
    base, one = ops.rope_frequencies(64, 600000.0, None, 32768)
    assert one == 1.0 and torch.equal(base, ops.rope_inv_freq(64, 600000.0))
    yarn, scale = ops.rope_frequencies(64, 600000.0, {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768}, 131072)
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1)  # 1.1386
    torch.testing.assert_close(yarn[:4], base[:4])  # fast-rotating dims are kept
    torch.testing.assert_close(yarn[-4:], base[-4:] / 4)  # slow ones are interpolated
    assert torch.all(yarn <= base + 1e-12) and torch.all(yarn >= base / 4 - 1e-12)
    with pytest.raises(ValueError, match="rope_scaling="):
        ops.rope_frequencies(64, 600000.0, {"type": "dynamic", "factor": 2.0}, 32768)
