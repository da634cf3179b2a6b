"""The fused attention-input op qkv_norm_rope (split heads, q/k RMSNorm, partial RoPE, cache write) against
an explicit composition; CUDA tests skip on the CPU."""
import pytest
import torch

from conftest import requires_cuda
from ringkern import ops
from ringkern.ops import inference
from ringkern.ops import reference as ref


def _case(B, T, Hq, Hkv, D, rot, dtype=torch.float32, device="cpu", norm=True, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g) * 3).to(device, dtype)
    weights = tuple((torch.rand(D, generator=g) + 0.5).to(device, dtype) for _ in range(2)) if norm else (None, None)
    positions = torch.stack([torch.randperm(S or 64, generator=g)[:T] for _ in range(B)]).to(device)
    cos, sin = ref.rope_cos_sin(positions, ref.rope_inv_freq(rot, 10000.0).to(device))
    return qkv, weights, cos, sin, positions


def _composition(qkv, q_weight, k_weight, cos, sin, Hq, Hkv, eps):
    """The attention's inputs as the model built them before the fused op, written out op by op."""
    B, T, C = qkv.shape
    D = C // (Hq + 2 * Hkv)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.reshape(B, T, Hq, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
    if q_weight is not None:
        q, k = ref.rms_norm(q, q_weight, eps), ref.rms_norm(k, k_weight, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return ref.apply_partial_rope(q, cos, sin), ref.apply_partial_rope(k, cos, sin), v


@pytest.mark.parametrize("norm", [True, False])
def test_cpu_op_equals_composition_and_writes_the_cache(norm):
    B, T, Hq, Hkv, D, rot, S = 3, 4, 4, 2, 16, 8, 64
    qkv, (qw, kw), cos, sin, positions = _case(B, T, Hq, Hkv, D, rot, norm=norm, S=S)
    k_cache, v_cache = torch.randn(B + 2, Hkv, S, D), torch.randn(B + 2, Hkv, S, D)
    before = (k_cache.clone(), v_cache.clone())
    q, k, v = torch.ops.ringkern.qkv_norm_rope(qkv, qw, kw, cos, sin, Hq, Hkv, 1e-6, k_cache, v_cache, positions)
    for got, want in zip((q, k, v), _composition(qkv, qw, kw, cos, sin, Hq, Hkv, 1e-6)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    written = torch.zeros(B + 2, S, dtype=torch.bool)
    for b in range(B):
        written[b, positions[b]] = True
        torch.testing.assert_close(k_cache[b, :, positions[b]], k[b], rtol=0, atol=0)
        torch.testing.assert_close(v_cache[b, :, positions[b]], v[b], rtol=0, atol=0)
    for cache, old in zip((k_cache, v_cache), before):  # nothing else changed
        assert torch.equal(cache.transpose(1, 2)[~written], old.transpose(1, 2)[~written])


def test_differentiable_version_equals_the_op_and_has_grads():
    qkv, (qw, kw), cos, sin, _ = _case(2, 5, 4, 2, 16, 16)
    qkv.requires_grad_()
    q, k, v = ops.qkv_norm_rope(qkv, qw, kw, cos, sin, 4, 2, 1e-6)
    (q.sum() + k.square().sum() + v.sum()).backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    for got, want in zip((q, k, v), torch.ops.ringkern.qkv_norm_rope(qkv.detach(), qw, kw, cos, sin, 4, 2, 1e-6,
                                                                     None, None, None)):
        torch.testing.assert_close(got.detach(), want)


def test_opcheck():
    qkv, (qw, kw), cos, sin, positions = _case(2, 3, 4, 2, 16, 8, S=16)
    k_cache, v_cache = torch.zeros(3, 2, 16, 16), torch.zeros(3, 2, 16, 16)
    torch.library.opcheck(torch.ops.ringkern.qkv_norm_rope,
                          (qkv, qw, kw, cos, sin, 4, 2, 1e-6, k_cache, v_cache, positions))
    torch.library.opcheck(torch.ops.ringkern.qkv_norm_rope, (qkv, None, None, cos, sin, 4, 2, 1e-6, None, None, None))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,rot,norm", [
    (1, 1, 32, 4, 128, 64, True),  # Ring-flash-2.0 decode
    (5, 3, 4, 2, 32, 16, True),  # a verify window of the tiny model
    (2, 7, 8, 8, 64, 64, False),  # full rotary, no qk norm, MHA
    (3, 2, 12, 2, 256, 96, True),  # wide heads: several channels per lane
])
def test_cuda_kernel_matches_reference(dtype, B, T, Hq, Hkv, D, rot, norm):
    S = 64
    qkv, (qw, kw), cos, sin, positions = _case(B, T, Hq, Hkv, D, rot, dtype, "cuda", norm, S)
    caches = [torch.randn(B + 1, Hkv, S, D, device="cuda").to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    got = inference.qkv_norm_rope(qkv, qw, kw, cos, sin, Hq, Hkv, 1e-6, *caches, positions)
    want = ref.qkv_norm_rope(qkv, qw, kw, cos, sin, Hq, Hkv, 1e-6, *ref_caches, positions)
    # the norm's sum of squares is reduced in another order: at most one rounding step of the dtype apart
    tol = dict(rtol=1.6e-2, atol=1.6e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("q", "k", "v", "k_cache", "v_cache"), (*got, *caches), (*want, *ref_caches)):
        assert g.shape == w.shape and g.is_contiguous(), name
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[2], want[2])  # v is only moved
    if dtype == torch.bfloat16:  # same rounding almost everywhere (fp32 differs in the last bits throughout)
        mismatch = (got[0] != want[0]).float().mean().item()
        assert mismatch < 0.01, f"q: {mismatch:.2%} of elements differ from the reference's rounding"


@requires_cuda
def test_cuda_model_decode_uses_the_cache_it_wrote():
    """Cached decode through the fused op equals the uncached forward (the composition) on CUDA."""
    from ringkern import RingConfig, RingFlashModel
    from ringkern.model import KVCache
    torch.manual_seed(0)
    model = RingFlashModel(RingConfig.from_preset("tiny")).cuda().eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 9), device="cuda")
    with torch.no_grad():
        full = model(ids, compute_mtp=False).logits
        cache = KVCache.allocate(model.config, 2, 16, dtype=torch.float32, device="cuda")
        model(ids[:, :6], kv_cache=cache, cache_rows=torch.arange(2, device="cuda"), compute_mtp=False)
        steps = [model(ids[:, t:t + 1], position_ids=torch.full((2, 1), t, device="cuda"), kv_cache=cache,
                       compute_mtp=False).logits for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], rtol=1e-4, atol=1e-4)
