"""MoE kernel ops (moe_route, moe_dispatch, moe_experts): CPU references, opcheck, compile, autograd, and
the CUDA kernels against the references (exact integers for routing, the 2x-bf16 error rule for experts)."""
import functools

import pytest
import torch

from conftest import requires_cuda
from ringkern import ops
from ringkern.ops import inference
from ringkern.ops import moe_reference as moe_ref
from ringkern.ops import reference as ref

SMALL = dict(n_group=4, topk_group=2, top_k=4, routed_scaling_factor=2.5)  # E = 16
RING = dict(n_group=8, topk_group=4, top_k=8, routed_scaling_factor=2.5)  # E = 256


def _route_config(E):
    return SMALL if E == 16 else RING


def _logits(T, E, device="cpu", ties=False):
    """fp32 logits; with ties, values on a coarse grid so many scores are exactly equal."""
    if ties:
        return (torch.randint(-4, 5, (T, E), device=device) / 4.0).float()
    return torch.randn(T, E, device=device)


def _experts(E, H, I, dtype, device="cpu", scale=0.05):
    gate_up = (torch.randn(E, 2 * I, H, device=device) * scale).to(dtype)
    down = (torch.randn(E, H, I, device=device) * scale).to(dtype)
    return gate_up, down


def _routing(T, E, k, device="cpu"):
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)]).int()
    weights = torch.rand(T, k, device=device) + 0.1
    return weights, ids


# ------------------------------------------------------------------------------------------ CPU


def test_dispatch_reference_is_a_stable_sort():
    ids = torch.tensor([[2, 0], [0, 2], [1, 2]], dtype=torch.int32)
    counts, offsets, sorted_slot, slot_pos = ops.moe_dispatch(ids, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert offsets.tolist() == [2, 3, 6, 6]
    assert sorted_slot.tolist() == [1, 2, 4, 0, 3, 5]
    assert torch.equal(sorted_slot[slot_pos.long()], torch.arange(6, dtype=torch.int32))


def test_moe_opcheck():
    T, E, H, I = 5, 16, 16, 8
    logits, bias = torch.randn(T, E, requires_grad=True), torch.randn(E) * 0.1
    args = (4, 2, 4, 2.5, True)
    torch.library.opcheck(torch.ops.ringkern.moe_route.default, (logits, bias, *args, None))
    replay = torch.randint(0, E, (T, 4), dtype=torch.int32)
    torch.library.opcheck(torch.ops.ringkern.moe_route.default, (logits, bias, *args, replay))
    torch.library.opcheck(torch.ops.ringkern.moe_route_backward.default,
                          (torch.randn(T, 4), logits.detach(), replay, 2.5, True))
    torch.library.opcheck(torch.ops.ringkern.moe_dispatch.default, (replay, E))
    gate_up, down = _experts(E, H, I, torch.float32)
    weights, ids = _routing(T, E, 4)
    leaves = [t.requires_grad_() for t in (torch.randn(T, H), weights, gate_up, down)]
    x, w, gu, dn = leaves
    torch.library.opcheck(torch.ops.ringkern.moe_experts_forward.default, (x, w, ids, gu, dn))
    _, gate_up_out, sorted_slot, slot_pos, offsets = torch.ops.ringkern.moe_experts_forward(x, w, ids, gu, dn)
    torch.library.opcheck(torch.ops.ringkern.moe_experts_backward.default,
                          (torch.randn(T, H), x.detach(), w.detach(), gu.detach(), dn.detach(),
                           gate_up_out.detach(), sorted_slot, slot_pos, offsets))


def _moe(logits, bias, x, gate_up, down, cfg):
    weights, ids, counts = ops.moe_route(logits, bias, **cfg)
    return ops.moe_experts(x, weights, ids, gate_up, down), counts


def test_moe_compiles_fullgraph_with_backward():
    T, E, H, I = 6, 16, 16, 8
    logits = torch.randn(T, E, requires_grad=True)
    bias = torch.randn(E) * 0.1
    x = torch.randn(T, H, requires_grad=True)
    gate_up, down = (t.requires_grad_() for t in _experts(E, H, I, torch.float32))
    compiled = torch.compile(lambda *a: _moe(*a, SMALL), fullgraph=True, backend="aot_eager")
    y, counts = compiled(logits, bias, x, gate_up, down)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (logits, x, gate_up, down)]
    for t in (logits, x, gate_up, down):
        t.grad = None
    y_eager, counts_eager = _moe(logits, bias, x, gate_up, down, SMALL)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    assert torch.equal(counts, counts_eager)
    for g, t in zip(got, (logits, x, gate_up, down)):
        torch.testing.assert_close(g, t.grad)


def test_route_autograd_matches_reference():
    for renormalize in (True, False):
        logits = torch.randn(9, 16, dtype=torch.float32, requires_grad=True)
        bias = torch.randn(16) * 0.1
        g = torch.randn(9, 4)
        w, ids, _ = ops.moe_route(logits, bias, renormalize=renormalize, **SMALL)
        (grad,) = torch.autograd.grad(w, logits, g)
        w_ref, ids_ref, _ = ref.moe_route(logits, bias, renormalize=renormalize, **SMALL)
        (grad_ref,) = torch.autograd.grad(w_ref, logits, g)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("T", [1, 7, 33])
def test_experts_autograd_matches_reference(T):
    E, H, I, k = 8, 12, 6, 3
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weights, ids = _routing(T, E, k)
    weights = weights.double().requires_grad_()
    gate_up, down = (t.requires_grad_() for t in _experts(E, H, I, torch.float64, scale=0.3))
    leaves = (x, weights, gate_up, down)
    g = torch.randn(T, H, dtype=torch.float64)
    grads = torch.autograd.grad(ops.moe_experts(x, weights, ids, gate_up, down), leaves, g)
    grads_ref = torch.autograd.grad(ref.moe_experts(x, weights, ids, gate_up, down), leaves, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *a: ops.moe_experts(a[0], a[1], ids, a[2], a[3]), leaves)


def test_experts_without_rows_give_zero_weight_grads():
    """T = 0 (an expert-parallel rank that receives no rows): zero gradients for both projections, not None."""
    E, H, I, k = 4, 8, 6, 2
    gate_up, down = (t.requires_grad_() for t in _experts(E, H, I, torch.float32))
    x = torch.randn(0, H, requires_grad=True)
    y = ref.moe_experts(x, torch.rand(0, k), torch.zeros(0, k, dtype=torch.int32), gate_up, down)
    assert y.shape == (0, H)
    y.sum().backward()
    assert gate_up.grad is not None and down.grad is not None
    assert not gate_up.grad.any() and not down.grad.any()


# ----------------------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("E", [16, 256])
@pytest.mark.parametrize("T", [1, 7, 64, 513, 4096])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kernel", ["default", "warp_per_token"])
def test_cuda_route_matches_reference(E, T, ties, kernel, monkeypatch):
    """Up to 64 tokens take the block-per-token kernel by default; RINGKERN_MOE_ROUTE_BLOCK_TOKENS=0 forces the
    warp-per-token one (the kernel of larger T)."""
    if kernel == "warp_per_token":
        monkeypatch.setenv("RINGKERN_MOE_ROUTE_BLOCK_TOKENS", "0")
    cfg = _route_config(E)
    logits = _logits(T, E, "cuda", ties)
    bias = (torch.randint(-2, 3, (E,), device="cuda") / 8.0) if ties else torch.randn(E, device="cuda") * 0.1
    for renormalize in (True, False):
        w, ids, counts = ops.moe_route(logits, bias, renormalize=renormalize, **cfg)
        w_ref, ids_ref, counts_ref = ref.moe_route(logits, bias, renormalize=renormalize, **cfg)
        assert ids.dtype == torch.int32 and counts.dtype == torch.int32
        assert torch.equal(ids, ids_ref)
        assert torch.equal(counts, counts_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)


@requires_cuda
@pytest.mark.parametrize("E", [16, 256])
def test_cuda_route_replay_and_backward(E):
    cfg = _route_config(E)
    T, k = 257, cfg["top_k"]
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    bias = torch.randn(E, device="cuda") * 0.1
    replay = torch.randint(0, E, (T, k), device="cuda", dtype=torch.int32)
    for ids_in in (replay, replay.long()):
        w, ids, counts = ops.moe_route(logits, bias, expert_ids=ids_in, **cfg)
        w_ref, ids_ref, counts_ref = ref.moe_route(logits, bias, expert_ids=ids_in, **cfg)
        assert torch.equal(ids, ids_ref) and torch.equal(counts, counts_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    g = torch.randn(T, k, device="cuda")
    w, ids, _ = ops.moe_route(logits, bias, **cfg)
    (grad,) = torch.autograd.grad(w, logits, g)
    w_ref, _, _ = ref.moe_route(logits, bias, **cfg)
    (grad_ref,) = torch.autograd.grad(w_ref, logits, g)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("E,T,k", [(16, 1, 4), (256, 64, 8), (256, 65, 8), (16, 513, 4), (256, 4096, 8),
                                   (256, 65536, 8)])  # up to 512 slots: the one-block dispatch
def test_cuda_dispatch_matches_reference(E, T, k):
    ids = torch.randint(0, E, (T, k), device="cuda", dtype=torch.int32)
    got = ops.moe_dispatch(ids, E)
    want = moe_ref.moe_dispatch(ids, E)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a, b)


@pytest.fixture(params=["cutlass", "cutlass_cooperative", "grouped_mm", "small"])
def experts_path(request, monkeypatch):
    """Forces one of the CUDA expert paths: the CUTLASS grouped GEMMs with fused epilogues (either tile
    variant; an error if they decline the shapes), torch._grouped_mm, or the few-rows kernels."""
    monkeypatch.setenv("RINGKERN_MOE_SMALL_SLOTS", str(1 << 30) if request.param == "small" else "0")
    monkeypatch.setenv("RINGKERN_MOE_CUTLASS", "0" if request.param == "grouped_mm" else "require")
    tile = "cooperative" if request.param.endswith("cooperative") else "pingpong"
    monkeypatch.setenv("RINGKERN_MOE_CUTLASS_TILE", tile)
    return request.param


def _captured(step):
    """(graph, outputs) of step() captured after two warm-up runs on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_experts_cuda(x, weights, ids, gate_up, down, kernel=ops.moe_experts):
    """Kernel vs fp32 reference, forward and all gradients: error <= 2x the bf16 eager reference's."""
    T, H = x.shape
    grad_y = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, gate_up, down)]
        w = weights.detach().clone().requires_grad_()
        y = fn(leaves[0], w, ids, leaves[1], leaves[2])
        grads = torch.autograd.grad(y, [leaves[0], w, leaves[1], leaves[2]], grad_y.to(dtype))
        return [y.float(), *(g.float() for g in grads)]

    got = run(kernel, torch.bfloat16)
    exact = run(ref.moe_experts, torch.float32)
    eager = run(ref.moe_experts, torch.bfloat16)
    names = ["y", "grad_x", "grad_weights", "grad_gate_up", "grad_down"]
    for name, g, e, b in zip(names, got, exact, eager):
        assert torch.isfinite(g).all(), name
        err, err_bf16 = _rel_err(g, e), _rel_err(b, e)
        assert err <= 2 * err_bf16 + 1e-5, f"{name}: kernel error {err:.3g} vs bf16 reference {err_bf16:.3g}"
    return got


@requires_cuda
@pytest.mark.parametrize("T", [1, 7, 513])
@pytest.mark.parametrize("H,I", [(256, 128), (128, 64)])  # 2I = 128: narrower than a CUTLASS tile
def test_cuda_experts_forward_backward(T, H, I, experts_path):
    E, k = 16, 4
    x = torch.randn(T, H, device="cuda").bfloat16()
    weights, ids = _routing(T, E, k, "cuda")
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda")
    _check_experts_cuda(x, weights, ids, gate_up, down)


@requires_cuda
@pytest.mark.parametrize("T", [1, 513])
def test_cuda_experts_atomic_combine(T, monkeypatch):
    """The opt-in combine fused into the down GEMM (fp32 atomics): the same error bound as the default."""
    monkeypatch.setenv("RINGKERN_MOE_SMALL_SLOTS", "0")
    monkeypatch.setenv("RINGKERN_MOE_CUTLASS", "require")  # an error if the CUTLASS kernels decline
    E, H, I, k = 16, 256, 128, 4
    x = torch.randn(T, H, device="cuda").bfloat16()
    weights, ids = _routing(T, E, k, "cuda")
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda")
    _check_experts_cuda(x, weights, ids, gate_up, down, functools.partial(ops.moe_experts, atomic_combine=True))


@requires_cuda
def test_cuda_experts_zero_token_experts_and_one_hot_expert(experts_path):
    E, H, I, k, T = 16, 256, 128, 4, 300
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda")
    x = torch.randn(T, H, device="cuda").bfloat16()
    weights = torch.rand(T, k, device="cuda") + 0.1
    # only experts 3, 5, 7, 9 are used, and each by every token: all other experts get zero tokens
    ids = torch.tensor([3, 5, 7, 9], device="cuda", dtype=torch.int32).expand(T, k).contiguous()
    _, _, grad_gate_up, grad_down = _check_experts_cuda(x, weights, ids, gate_up, down)[1:]
    unused = [e for e in range(E) if e not in (3, 5, 7, 9)]
    assert (grad_gate_up[unused] == 0).all() and (grad_down[unused] == 0).all()
    # every slot of every token on one expert (k = 1)
    _check_experts_cuda(x, weights[:, :1].contiguous(), torch.full((T, 1), 11, device="cuda", dtype=torch.int32),
                        gate_up, down)


@requires_cuda
def test_cuda_experts_under_autocast_take_the_kernel_with_fp32_master_weights():
    """The trainer's case: fp32 parameters under bf16 autocast run the bf16 kernel (not the per-expert
    reference loop) and their gradients come back fp32."""
    E, H, I, k, T = 16, 256, 128, 4, 64
    gate_up, down = (t.requires_grad_() for t in _experts(E, H, I, torch.float32, "cuda"))
    x = torch.randn(T, H, device="cuda", requires_grad=True)
    weights, ids = _routing(T, E, k, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ops.moe_experts(x, weights, ids, gate_up, down)
    y_bf16 = torch.ops.ringkern.moe_experts_forward(x.detach().bfloat16(), weights, ids,
                                                   gate_up.detach().bfloat16(), down.detach().bfloat16())[0]
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_bf16)
    y.float().sum().backward()
    assert gate_up.grad.dtype == down.grad.dtype == x.grad.dtype == torch.float32
    assert gate_up.grad.any() and down.grad.any()


@requires_cuda
def test_cuda_experts_bitwise_deterministic(experts_path):
    E, H, I, k, T = 64, 512, 256, 8, 4096
    gate_up, down = (t.requires_grad_() for t in _experts(E, H, I, torch.bfloat16, "cuda"))
    x = torch.randn(T, H, device="cuda").bfloat16().requires_grad_()
    weights, ids = _routing(T, E, k, "cuda")
    weights.requires_grad_()
    grad_y = torch.randn(T, H, device="cuda").bfloat16()

    def run():
        y = ops.moe_experts(x, weights, ids, gate_up, down)
        return [y, *torch.autograd.grad(y, [x, weights, gate_up, down], grad_y)]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_graph_decode_matches_eager(experts_path):
    T, E, H, I = 64, 256, 512, 128
    cfg = RING
    router = torch.randn(E, H, device="cuda") * 0.05
    bias = torch.randn(E, device="cuda") * 0.01
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda")
    static_x = torch.randn(T, H, device="cuda").bfloat16()

    def step(x):
        weights, ids, counts = ops.moe_route(x.float() @ router.t(), bias, **cfg)
        return ops.moe_experts(x, weights, ids, gate_up, down), ids, counts

    graph, static_out = _captured(functools.partial(step, static_x))
    for _ in range(3):
        static_x.copy_(torch.randn(T, H, device="cuda").bfloat16())
        graph.replay()
        eager = step(static_x)
        for a, b in zip(static_out, eager):
            assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("T", [64, 600])
def test_cuda_experts_ring_shapes_forward(T, experts_path):
    E, H, I, k = 256, 4096, 1024, 8
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda", scale=0.02)
    x = torch.randn(T, H, device="cuda").bfloat16()
    weights, ids = _routing(T, E, k, "cuda")
    with torch.no_grad():
        got = ops.moe_experts(x, weights, ids, gate_up, down).float()
        eager = ref.moe_experts(x, weights, ids, gate_up, down).float()
        exact = ref.moe_experts(x.float(), weights, ids, gate_up.float(), down.float())
    assert _rel_err(got, exact) <= 2 * _rel_err(eager, exact) + 1e-5


def _shared_expert(H, Is, dtype, device):
    return [(torch.randn(*shape, device=device) * 0.05).to(dtype) for shape in ((Is, H), (Is, H), (H, Is))]


# T=300 (2400 slots) and Is=192 (not a multiple of 128) take the routed forward plus ATen's shared MLP.
@requires_cuda
@pytest.mark.parametrize("T,Is", [(1, 128), (7, 256), (16, 128), (64, 128), (300, 128), (3, 192)])
def test_cuda_moe_block_inference_matches_reference(T, Is):
    E, H, I, k = 64, 512, 128, 8
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda")
    shared = _shared_expert(H, Is, torch.bfloat16, "cuda")
    x = torch.randn(T, H, device="cuda").bfloat16()
    weights, ids = _routing(T, E, k, "cuda")
    got = torch.ops.ringkern.moe_block_inference(x, weights, ids, gate_up, down, *shared)
    assert torch.equal(got, torch.ops.ringkern.moe_block_inference(x, weights, ids, gate_up, down, *shared))
    eager = inference.moe_block_inference_reference(x, weights, ids, gate_up, down, *shared)
    exact = inference.moe_block_inference_reference(x.float(), weights, ids, gate_up.float(), down.float(),
                                                    *(t.float() for t in shared))
    assert _rel_err(got, exact) <= 2 * _rel_err(eager, exact) + 1e-5


@requires_cuda
def test_cuda_moe_block_inference_graph_capture_and_bad_shared_weights():
    E, H, I, k, T = 64, 512, 128, 8, 4
    gate_up, down = _experts(E, H, I, torch.bfloat16, "cuda")
    shared = _shared_expert(H, I, torch.bfloat16, "cuda")
    static_x = torch.randn(T, H, device="cuda").bfloat16()
    weights, ids = _routing(T, E, k, "cuda")

    def step():
        return torch.ops.ringkern.moe_block_inference(static_x, weights, ids, gate_up, down, *shared)

    graph, static_out = _captured(step)
    static_x.copy_(torch.randn(T, H, device="cuda").bfloat16())
    graph.replay()
    assert torch.equal(static_out, step())
    with pytest.raises(RuntimeError, match="'shared_down'"):
        torch.ops.ringkern.moe_block_inference(static_x, weights, ids, gate_up, down, shared[0], shared[1],
                                               shared[2].t().contiguous())


def test_moe_block_inference_cpu_op_and_sync_free_path_match_the_reference():
    E, H, I, Is, k, T = 16, 32, 16, 24, 4, 5
    gate_up, down = _experts(E, H, I, torch.float32)
    shared = _shared_expert(H, Is, torch.float32, "cpu")
    x = torch.randn(T, H)
    weights, ids = _routing(T, E, k)
    want = ref.moe_experts(x, weights, ids, gate_up, down) + torch.nn.functional.linear(
        torch.nn.functional.silu(x @ shared[0].t()) * (x @ shared[1].t()), shared[2])
    torch.testing.assert_close(torch.ops.ringkern.moe_block_inference(x, weights, ids, gate_up, down, *shared), want)
    torch.testing.assert_close(inference.moe_block(x, weights, ids, gate_up, down, *shared), want)


def test_router_logits_cpu_matches_fp32_linear_and_grads():
    x = torch.randn(7, 24, requires_grad=True)
    w = torch.randn(16, 24, requires_grad=True)
    g = torch.randn(7, 16)
    gx, gw = torch.autograd.grad(ops.router_logits(x, w), (x, w), g)
    torch.testing.assert_close(gx, g @ w.detach())
    torch.testing.assert_close(gw, g.t() @ x.detach())
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    out = ops.router_logits(xb, wb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, xb.float() @ wb.float().t())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.router_logits(xb, wb).dtype == torch.float32
    torch.library.opcheck(torch.ops.ringkern.router_logits.default,
                          (xb.float().requires_grad_(), wb.float().requires_grad_()))


@requires_cuda
@pytest.mark.parametrize("N", [0, 1, 37, 4096])
def test_cuda_router_logits_bf16_equal_the_fp32_gemm_of_the_upcasts(N):
    x = torch.randn(N, 4096, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(256, 4096, device="cuda") * 0.02).bfloat16().requires_grad_()
    out = ops.router_logits(x, w)
    want = x.detach().double() @ w.detach().double().t()
    assert out.dtype == torch.float32 and out.shape == (N, 256)
    if N:
        assert ((out.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        g = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, w), g)
        torch.testing.assert_close(gx.float(), (g @ w.float()).bfloat16().float())
        torch.testing.assert_close(gw.float(), (g.t() @ x.float()).bfloat16().float(), rtol=2e-2, atol=1e-2)
    fp32 = ops.router_logits(x.detach().float(), w.detach().float())  # fallback: fp32 GEMM
    torch.testing.assert_close(fp32, x.detach().float() @ w.detach().float().t(), rtol=1e-4, atol=1e-4)


@requires_cuda
def test_cuda_moe_block_shared_expert_stream_matches_sequential(monkeypatch):
    """The shared expert on its side stream gives the outputs and gradients of the sequential block (within
    bf16 rounding: cuBLAS may pick other kernels on another stream; a missing join would not be close)."""
    from ringkern import model as model_mod
    from ringkern.config import RingConfig

    torch.manual_seed(0)
    block = model_mod.MoEBlock(RingConfig.from_preset("tiny")).cuda()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    block = block.bfloat16()
    x = torch.randn(3, model_mod.SIDE_STREAM_MIN_TOKENS // 2, 256, device="cuda").bfloat16()

    def run():
        leaf = x.detach().requires_grad_()
        y, routing = block(leaf)
        grads = torch.autograd.grad(y.float().square().sum(), [leaf, *block.parameters()])
        return [y, *grads], routing.expert_ids

    assert model_mod.side_stream(x.view(-1, 256)) is not None
    overlapped, ids = run()
    monkeypatch.setattr(model_mod, "side_stream", lambda _: None)
    sequential, ids_sequential = run()
    assert torch.equal(ids, ids_sequential)
    for a, b in zip(overlapped, sequential):
        assert _rel_err(a, b) < 1e-2
