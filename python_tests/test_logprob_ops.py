"""Fused log-prob ops (token_logprobs, linear_cross_entropy, icepop_policy_loss) against the references.

CPU: opcheck, torch.compile, gradients of the op path against autograd through the reference.
CUDA: the kernels against a float64 reference on fresh random inputs at odd sizes, with the issue's
tolerances (log-probs 2e-3 absolute for bf16; loss, metrics and gradients 1e-2 relative and within 2x the
error of the bf16 eager reference), IcePop edge cases, determinism and argument checks.
"""
import math

import pytest
import torch
from conftest import requires_cuda

from ringkern import ops
from ringkern.ops import reference as ref

# ----------------------------------------------------------------------------- inputs


def linear_inputs(T, H, V, dtype=torch.float32, device="cpu", logit_std=2.0):
    """hidden [T, H] ~ N(0, 1), weight [V, H] scaled so logits have std ~logit_std, targets [T]."""
    hidden = torch.randn(T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * (logit_std / math.sqrt(H))).to(dtype)
    targets = torch.randint(0, V, (T,), device=device)
    return hidden, weight, targets


def policy_inputs(hidden, weight, targets, seq_lens, log_k_std=1.0, ratio_std=0.3):
    """old/rollout log-probs, advantages, loss mask and cu_seqlens around the current policy's log-probs."""
    T, device = hidden.shape[0], hidden.device
    logp = ref.token_logprobs(hidden.double(), weight.double(), targets).float()
    old = logp + ratio_std * torch.randn(T, device=device)
    rollout = old - log_k_std * torch.randn(T, device=device)  # k = exp(old - rollout) spans [alpha, beta]
    advantages = torch.randn(T, device=device)
    mask = torch.rand(T, device=device) < 0.8
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    assert cu[-1] == T
    return old, rollout, advantages, mask, cu


def rel_err(x, ref_x):
    x, ref_x = x.double(), ref_x.double()
    return ((x - ref_x).norm() / ref_x.norm().clamp_min(1e-30)).item()


def assert_close_to_oracle(name, ours, eager, oracle, rtol=1e-2):
    """Relative error of ours vs the fp64 oracle <= rtol and <= 2x the bf16 eager reference's error."""
    err, eager_err = rel_err(ours, oracle), rel_err(eager, oracle)
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"
    assert err <= max(2 * eager_err, 1e-5), f"{name}: error {err:.2e} > 2x eager bf16 error {eager_err:.2e}"


def grads_of(fn, hidden, weight):
    """(output, grad_hidden, grad_weight) of fn(hidden, weight) -> (scalar, aux) via autograd."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out, aux = fn(h, w)
    out.backward()
    return out.detach(), aux, h.grad, w.grad


def icepop_fn(impl, targets, policy, **kw):
    def fn(h, w):
        loss, metrics = impl(h, w, targets, *policy, **kw)
        return loss, {k: v.detach() for k, v in metrics.items()}
    return fn


# -------------------------------------------------------------------------- CPU: op registration


def test_opcheck_token_logprobs_cpu():
    hidden, weight, targets = linear_inputs(7, 8, 11, torch.float64)
    hidden.requires_grad_()
    torch.library.opcheck(torch.ops.ringkern.token_logprobs.default, (hidden, weight, targets, 0.7))
    lse = torch.randn(7, dtype=torch.float64)
    args = (torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64), hidden.detach(), weight,
            targets, lse, torch.rand(7, dtype=torch.float64), 0.7, True, False)
    torch.library.opcheck(torch.ops.ringkern.token_logprobs_backward.default, args)


@pytest.mark.parametrize("with_buffer", [False, True])
def test_opcheck_icepop_policy_loss_cpu(with_buffer):
    hidden, weight, targets = linear_inputs(9, 8, 13)
    policy = policy_inputs(hidden, weight, targets, [4, 5])
    buffer = torch.zeros(13, 8) if with_buffer else None
    args = (hidden, weight, targets, *policy, 0.5, 5.0, 0.2, 0.2, 1.0, "icepop", "seq-mean-token-mean", 2.0,
            True, True, buffer)
    torch.library.opcheck(torch.ops.ringkern.icepop_policy_loss.default, args)


def test_opcheck_linear_cross_entropy_and_attach_grads_cpu():
    hidden, weight, targets = linear_inputs(9, 8, 13)
    targets[2] = -100
    args = (hidden, weight, targets, -100, torch.rand(9), "mean", True, True, None)
    torch.library.opcheck(torch.ops.ringkern.linear_cross_entropy.default, args)
    loss, grad_hidden, grad_weight = torch.ops.ringkern.linear_cross_entropy(*args)
    attach = (loss, hidden.requires_grad_(), weight.requires_grad_(), grad_hidden, grad_weight, False)
    torch.library.opcheck(torch.ops.ringkern.attach_grads.default, attach)


def test_torch_compile_fullgraph_over_icepop_call():
    hidden, weight, targets = linear_inputs(10, 8, 13)
    policy = policy_inputs(hidden, weight, targets, [3, 7])

    def step(h, w):
        loss, metrics = ops.icepop_policy_loss(h, w, targets, *policy, temperature=0.9)
        return loss, metrics["clip_frac"]

    eager = grads_of(step, hidden, weight)
    compiled = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), hidden, weight)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------- CPU: gradients vs reference


def test_token_logprobs_grads_match_reference_cpu():
    hidden, weight, targets = linear_inputs(6, 8, 11, torch.float64)
    g_logp, g_ent = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    def objective(impl):
        def fn(h, w):
            logp, ent = impl(h, w, targets, 0.8, return_entropy=True)
            return (logp * g_logp).sum() + (ent * g_ent).sum(), None
        return fn

    ours, expected = grads_of(objective(ops.token_logprobs), hidden, weight), grads_of(objective(ref.token_logprobs),
                                                                                       hidden, weight)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h, w: ops.token_logprobs(h, w, targets, 0.8, True),
                                    (hidden.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_grads_match_reference_cpu(reduction):
    hidden, weight, targets = linear_inputs(8, 8, 11, torch.float64)
    targets[[1, 5]] = -100
    token_weights = torch.rand(8, dtype=torch.float64)

    def objective(impl):
        return lambda h, w: (impl(h, w, targets, -100, token_weights, reduction).sum(), None)

    for a, b in zip(grads_of(objective(ops.linear_cross_entropy), hidden, weight),
                    grads_of(objective(ref.linear_cross_entropy), hidden, weight)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("correction", ["icepop", "tis", "none"])
@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_icepop_grads_and_metrics_match_reference_cpu(correction, aggregation):
    hidden, weight, targets = linear_inputs(12, 8, 13, torch.float64)
    policy = policy_inputs(hidden, weight, targets, [5, 0, 7])
    kw = dict(correction=correction, aggregation=aggregation, temperature=1.3)
    ours = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy, **kw), hidden, weight)
    expected = grads_of(icepop_fn(ref.icepop_policy_loss, targets, policy, **kw), hidden, weight)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_grad_weight_buffer_cpu():
    hidden, weight, targets = linear_inputs(9, 8, 13)
    policy = policy_inputs(hidden, weight, targets, [9])
    _, _, _, grad_weight = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy), hidden, weight)
    buffer = torch.ones(13, 8)
    w = weight.clone().requires_grad_()
    loss, _ = ops.icepop_policy_loss(hidden, w, targets, *policy, grad_weight_buffer=buffer)
    loss.backward()
    assert w.grad is None
    torch.testing.assert_close(buffer, 1 + grad_weight)
    loss, _ = ops.icepop_policy_loss(hidden, w, targets, *policy, grad_weight_buffer=buffer)
    with pytest.raises(RuntimeError, match="grad_weight_buffer"):
        (2 * loss).backward()


def test_autocast_casts_fp32_master_weight_and_returns_its_grad_cpu():
    hidden, weight, targets = linear_inputs(6, 8, 13)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(hidden, w, targets)
    loss.backward()
    expected = ref.linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets)
    torch.testing.assert_close(loss, expected)
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_no_grad_skips_gradients_cpu():
    hidden, weight, targets = linear_inputs(5, 8, 13)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(hidden.requires_grad_(), weight, targets)
    assert not loss.requires_grad


# -------------------------------------------------------------------------------------- CUDA


def cuda_linear_inputs(T, H, V, dtype=torch.bfloat16):
    return linear_inputs(T, H, V, dtype, device="cuda")


@requires_cuda
@pytest.mark.parametrize("V", [3, 1000, 50257])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("stats", ["stats_gemm", "stats_gemm_cooperative", "chunked"])
def test_token_logprobs_bf16_vs_fp64(V, temperature, stats, monkeypatch):
    """The forward: the CUTLASS GEMM reducing logits to statistics in its epilogue (both tiles), or the
    chunked pass through fp32 logits."""
    monkeypatch.setenv("RINGKERN_LOGPROB_STATS_GEMM", "0" if stats == "chunked" else "require")
    monkeypatch.setenv("RINGKERN_LOGPROB_STATS_TILE", "cooperative" if stats.endswith("cooperative") else "pingpong")
    if stats == "stats_gemm":
        monkeypatch.setenv("RINGKERN_LOGPROB_STATS_CHUNK_ROWS", "16")  # 3 GEMMs: exercises the chunk loop
    hidden, weight, targets = cuda_linear_inputs(37, 96, V)
    logp, ent = ops.token_logprobs(hidden, weight, targets, temperature, return_entropy=True)
    logp64, ent64 = ref.token_logprobs(hidden.double(), weight.double(), targets, temperature, True)
    assert logp.dtype == torch.float32 and logp.shape == (37,)
    assert (logp.double() - logp64).abs().max().item() <= 2e-3
    assert (ent.double() - ent64).abs().max().item() <= 2e-3


LOGITS = pytest.mark.parametrize("logits", ["bf16", "fp32"])


def use_logits(monkeypatch, logits):
    """The gradient passes' logits buffer: bf16 (the default for bf16 inputs) or fp32."""
    monkeypatch.setenv("RINGKERN_LOGPROB_BF16_LOGITS", "1" if logits == "bf16" else "0")


@requires_cuda
@pytest.mark.parametrize("V", [1000, 50257])
@LOGITS
def test_token_logprobs_grads_bf16_vs_fp64(V, logits, monkeypatch):
    use_logits(monkeypatch, logits)
    monkeypatch.setenv("RINGKERN_LOGPROB_MAX_CHUNK_ROWS", "8")  # 5 chunks: exercises the chunk loop
    hidden, weight, targets = cuda_linear_inputs(37, 96, V)
    g_logp, g_ent = torch.randn(37, device="cuda"), torch.randn(37, device="cuda")

    def objective(impl):
        def fn(h, w):
            logp, ent = impl(h, w, targets, 0.9, return_entropy=True)
            return (logp.double() * g_logp).sum() + (ent.double() * g_ent).sum(), None
        return fn

    ours = grads_of(objective(ops.token_logprobs), hidden, weight)
    eager = grads_of(objective(ref.token_logprobs), hidden, weight)
    oracle = grads_of(objective(ref.token_logprobs), hidden.double(), weight.double())
    for name, a, b, c in zip(("objective", "aux", "grad_hidden", "grad_weight"), ours, eager, oracle):
        if a is not None:
            assert_close_to_oracle(name, a, b, c)


@requires_cuda
@pytest.mark.parametrize("V", [1000, 50257])
@pytest.mark.parametrize("correction,aggregation",
                         [("icepop", "seq-mean-token-mean"), ("tis", "token-mean"), ("none", "seq-mean-token-mean")])
@LOGITS
def test_icepop_bf16_vs_fp64(V, correction, aggregation, logits, monkeypatch):
    use_logits(monkeypatch, logits)
    monkeypatch.setenv("RINGKERN_LOGPROB_MAX_CHUNK_ROWS", "16")
    monkeypatch.setenv("RINGKERN_LOGPROB_STATS_CHUNK_ROWS", "8")  # bf16: two statistics GEMMs per chunk
    hidden, weight, targets = cuda_linear_inputs(37, 96, V)
    policy = policy_inputs(hidden, weight, targets, [10, 15, 0, 12])
    kw = dict(correction=correction, aggregation=aggregation, temperature=1.1)
    ours = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy, **kw), hidden, weight)
    eager = grads_of(icepop_fn(ref.icepop_policy_loss, targets, policy, **kw), hidden, weight)
    oracle = grads_of(icepop_fn(ref.icepop_policy_loss, targets, policy, **kw), hidden.double(), weight.double())
    assert_close_to_oracle("loss", ours[0], eager[0], oracle[0])
    for name in ops.ICEPOP_METRICS:
        assert_close_to_oracle(name, ours[1][name], eager[1][name], oracle[1][name])
    assert_close_to_oracle("grad_hidden", ours[2], eager[2], oracle[2])
    assert_close_to_oracle("grad_weight", ours[3], eager[3], oracle[3])
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16


@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@LOGITS
def test_linear_cross_entropy_bf16_vs_fp64(reduction, logits, monkeypatch):
    use_logits(monkeypatch, logits)
    hidden, weight, targets = cuda_linear_inputs(37, 96, 1000)
    targets[::5] = -100
    token_weights = torch.rand(37, device="cuda")

    def objective(impl):
        return lambda h, w: (impl(h, w, targets, -100, token_weights, reduction), None)

    ours = grads_of(objective(ops.linear_cross_entropy), hidden, weight)
    eager = grads_of(objective(ref.linear_cross_entropy), hidden, weight)
    oracle = grads_of(objective(ref.linear_cross_entropy), hidden.double(), weight.double())
    for name, a, b, c in zip(("loss", "aux", "grad_hidden", "grad_weight"), ours, eager, oracle):
        if a is not None:
            assert_close_to_oracle(name, a, b, c)


@requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the statistics GEMM that stores bf16 logits is built for sm_90a")
def test_bf16_logits_switch_changes_the_path_on_hopper(monkeypatch):
    """Both gradient paths run (and differ in their last bits): the parametrized tests above cover each."""
    hidden, weight, targets = cuda_linear_inputs(64, 128, 3000)
    policy = policy_inputs(hidden, weight, targets, [64])
    grads = {}
    for logits in ("bf16", "fp32"):
        use_logits(monkeypatch, logits)
        grads[logits] = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy), hidden, weight)
    assert rel_err(grads["bf16"][0], grads["fp32"][0]) < 1e-4  # the loss: fp32 statistics on both paths
    assert not torch.equal(grads["bf16"][2], grads["fp32"][2])
    assert rel_err(grads["bf16"][2], grads["fp32"][2]) < 1e-2


@requires_cuda
def test_fp32_inputs_match_fp64_tightly():
    hidden, weight, targets = cuda_linear_inputs(37, 96, 1000, torch.float32)
    policy = policy_inputs(hidden, weight, targets, [37])
    ours = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy), hidden, weight)
    oracle = grads_of(icepop_fn(ref.icepop_policy_loss, targets, policy), hidden.double(), weight.double())
    for name, a, b in (("loss", ours[0], oracle[0]), ("grad_hidden", ours[2], oracle[2]),
                       ("grad_weight", ours[3], oracle[3])):
        assert rel_err(a, b) <= 1e-4, name
    assert ours[3].dtype == torch.float32


@requires_cuda
def test_icepop_hand_built_cases_cuda():
    hidden, weight, targets = cuda_linear_inputs(6, 64, 300)
    logp = ops.token_logprobs(hidden, weight, targets)
    log_k = torch.tensor([math.log(0.4), 0.0, math.log(6.0), math.log(2.0), 0.0, 0.0], device="cuda")
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, 2.0, 0.5], device="cuda")
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool, device="cuda")
    cu = torch.tensor([0, 3, 6], dtype=torch.int32, device="cuda")
    h = hidden.clone().requires_grad_()
    loss, m = ops.icepop_policy_loss(h, weight, targets, logp, logp - log_k, adv, mask, cu)
    terms = [0.0, 1.0, 0.0, -2.0, 2.0]  # r = 1: icepop weights [0, 1, 0, 2, 1] x A
    assert loss.item() == pytest.approx(-(sum(terms[:3]) / 3 + sum(terms[3:]) / 2) / 2, abs=1e-5)
    assert m["masked_low_frac"].item() == pytest.approx(0.2) and m["masked_high_frac"].item() == pytest.approx(0.2)
    loss.backward()
    assert torch.all(h.grad[[0, 2, 5]] == 0) and torch.all(h.grad[[1, 3, 4]].abs().sum(-1) > 0)
    tis, _ = ops.icepop_policy_loss(hidden, weight, targets, logp, logp - log_k, adv, mask, cu, correction="tis",
                                    aggregation="token-mean")
    assert tis.item() == pytest.approx(-(0.4 + 1.0 + 2.0 - 2.0 + 2.0) / 5, abs=1e-5)


@requires_cuda
@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("mask_all", [True, False])
def test_icepop_every_token_masked_cuda(aggregation, mask_all):
    hidden, weight, targets = cuda_linear_inputs(37, 96, 1000)
    old, _, adv, _, cu = policy_inputs(hidden, weight, targets, [20, 17])
    rollout = old - math.log(100.0)  # k = 100 > beta: IcePop drops every token
    mask = torch.full((37,), mask_all, dtype=torch.bool, device="cuda")
    loss, metrics, grad_hidden, grad_weight = grads_of(
        icepop_fn(ops.icepop_policy_loss, targets, (old, rollout, adv, mask, cu), aggregation=aggregation),
        hidden, weight)
    assert loss.item() == 0.0
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert torch.all(grad_hidden == 0) and torch.all(grad_weight == 0)


@requires_cuda
def test_zero_tokens_cuda():
    hidden, weight, targets = cuda_linear_inputs(0, 96, 1000)
    old, rollout, adv, mask, _ = (torch.zeros(0, device="cuda") for _ in range(5))
    cu = torch.zeros(1, dtype=torch.int32, device="cuda")
    loss, metrics, grad_hidden, grad_weight = grads_of(
        icepop_fn(ops.icepop_policy_loss, targets, (old, rollout, adv, mask.bool(), cu)), hidden, weight)
    assert loss.item() == 0.0 and all(torch.isfinite(v).all() for v in metrics.values())
    assert grad_hidden.shape == (0, 96) and torch.all(grad_weight == 0)
    assert ops.token_logprobs(hidden, weight, targets).shape == (0,)


@requires_cuda
def test_grad_weight_buffer_cuda():
    hidden, weight, targets = cuda_linear_inputs(37, 96, 1000)
    policy = policy_inputs(hidden, weight, targets, [37])
    _, _, _, grad_weight = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy), hidden, weight)
    start = torch.randn(1000, 96, device="cuda")
    buffer = start.clone()
    w = weight.clone().requires_grad_()
    loss, _ = ops.icepop_policy_loss(hidden, w, targets, *policy, grad_weight_buffer=buffer)
    loss.backward()
    assert w.grad is None
    assert rel_err(buffer - start, grad_weight.float()) <= 1e-2


@requires_cuda
def test_icepop_deterministic_cuda(monkeypatch):
    monkeypatch.setenv("RINGKERN_LOGPROB_MAX_CHUNK_ROWS", "16")
    hidden, weight, targets = cuda_linear_inputs(37, 96, 50257)
    policy = policy_inputs(hidden, weight, targets, [37])
    first = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy), hidden, weight)
    second = grads_of(icepop_fn(ops.icepop_policy_loss, targets, policy), hidden, weight)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


@requires_cuda
def test_bad_inputs_name_the_argument_cuda():
    hidden, weight, targets = cuda_linear_inputs(8, 64, 100)
    policy = policy_inputs(hidden, weight, targets, [8])
    old, rollout, adv, mask, cu = policy
    cases = [
        ("hidden", (hidden.t().contiguous().t(), weight, targets), {}),
        ("weight", (hidden, weight[:, :32].contiguous(), targets), {}),
        ("weight", (hidden, weight.cpu(), targets), {}),
        ("targets", (hidden, weight, targets.int()), {}),
        ("targets", (hidden, weight, targets.clone().fill_(100)), {}),
        ("temperature", (hidden, weight, targets, 0.0), {}),
    ]
    for name, args, kw in cases:
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            ops.token_logprobs(*args, **kw)
    with pytest.raises(RuntimeError, match="argument 'weight'"):  # the public functions cast; the op checks
        torch.ops.ringkern.token_logprobs(hidden, weight.float(), targets, 1.0)
    policy_cases = [
        ("loss_mask", (old, rollout, adv, mask.float(), cu)),
        ("advantages", (old, rollout, adv[:4], mask, cu)),
        ("old_logprobs", (old.double(), rollout, adv, mask, cu)),
        ("cu_seqlens", (old, rollout, adv, mask, torch.tensor([0, 5], dtype=torch.int32, device="cuda"))),
    ]
    for name, policy_args in policy_cases:
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            ops.icepop_policy_loss(hidden, weight, targets, *policy_args)
    with pytest.raises(RuntimeError, match="argument 'grad_weight_acc'"):
        ops.icepop_policy_loss(hidden, weight.requires_grad_(), targets, *policy,
                               grad_weight_buffer=torch.zeros(100, 64, device="cuda", dtype=torch.bfloat16))
