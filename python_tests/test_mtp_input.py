"""The fused MTP input op (eh_proj(cat[enorm(emb), hnorm(h)])) against its float64 reference and the
model's MTP logits against an unfused composition. CUDA tests skip on the CPU with the reason shown."""
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from ringkern import RingConfig, RingFlashModel, ops
from ringkern.model import shift_left
from ringkern.ops import reference as ref

EPS = 1e-6


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(shape, dtype, device, norm_dtype=None):
    H = shape[-1]
    g = torch.Generator().manual_seed(sum(shape) * 7 + (dtype == torch.bfloat16))
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    return dict(embeds=mk(*shape).to(dtype), hidden=mk(*shape, scale=3.0).to(dtype),
                enorm_weight=(1 + 0.1 * mk(H)).to(norm_dtype or dtype),
                hnorm_weight=(1 + 0.1 * mk(H)).to(norm_dtype or dtype),
                eh_weight=mk(H, 2 * H, scale=H ** -0.5).to(dtype))


def _fwd_bwd(fn, inputs, grad_out):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves, eps=EPS)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _unfused(embeds, hidden, enorm_weight, hnorm_weight, eh_weight, eps):
    """The PyTorch composition the op replaces: two norms, cat, linear (all in the inputs' dtype)."""
    cat = torch.cat([F.rms_norm(embeds, (embeds.shape[-1],), enorm_weight.to(embeds.dtype), eps),
                     F.rms_norm(hidden, (hidden.shape[-1],), hnorm_weight.to(hidden.dtype), eps)], dim=-1)
    return F.linear(cat, eh_weight)


def _check_against_fp64(shape, dtype, device, norm_dtype=None):
    inputs = _inputs(shape, dtype, device, norm_dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    out, grads = _fwd_bwd(ops.mtp_input, inputs, grad_out)
    out64, grads64 = _fwd_bwd(ref.mtp_input, {k: v.double() for k, v in inputs.items()}, grad_out.double())
    eager, grads_eager = _fwd_bwd(_unfused, inputs, grad_out)
    assert out.dtype == dtype and out.shape == shape
    floor = 1e-5 if dtype == torch.float32 else 2e-3
    assert _rel(out, out64) <= max(2 * _rel(eager, out64), floor)
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        assert _rel(g, grads64[name]) <= max(2 * _rel(grads_eager[name], grads64[name]), floor), name


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 40), (1, 8)])
def test_mtp_input_cpu_matches_float64(shape):
    _check_against_fp64(shape, torch.float32, "cpu")


def test_mtp_input_gradcheck_and_opcheck():
    inputs = {k: v.double().requires_grad_() for k, v in _inputs((3, 6), torch.float32, "cpu").items()}
    assert torch.autograd.gradcheck(lambda *a: ops.mtp_input(*a, EPS), tuple(inputs.values()))
    args = tuple(v.float().detach().requires_grad_() for v in inputs.values())
    torch.library.opcheck(torch.ops.ringkern.mtp_input.default, (*args, EPS))


def test_mtp_input_compiles_fullgraph():
    inputs = _inputs((4, 16), torch.float32, "cpu")
    fn = torch.compile(lambda **kw: ops.mtp_input(**kw, eps=EPS) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(**inputs), ops.mtp_input(**inputs, eps=EPS) * 2)


def test_model_mtp_logits_equal_unfused_composition():
    torch.manual_seed(0)
    model = RingFlashModel(RingConfig.from_preset("tiny", vocab_size=97))
    ids = torch.randint(0, 97, (2, 11))
    out = model(ids)
    layer = model.mtp_layers[0]
    embeds = model.model.word_embeddings(shift_left(ids, 1))
    z = layer.eh_proj(torch.cat([layer.enorm(embeds), layer.hnorm(out.hidden_states)], dim=-1))
    cos, sin = model.rope(torch.arange(ids.shape[1]).expand_as(ids))
    z, _ = super(type(layer), layer).forward(z, cos, sin, None, out.expert_ids[model.config.num_hidden_layers])
    torch.testing.assert_close(out.mtp_logits[0], model.lm_head(layer.final_layernorm(z)), rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 128), (37, 256), (3, 5, 1000), (300, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtp_input_cuda_matches_float64(shape, dtype):
    _check_against_fp64(shape, dtype, "cuda")


@requires_cuda
def test_mtp_input_cuda_fp32_norm_weights_and_autocast():
    _check_against_fp64((64, 512), torch.bfloat16, "cuda", norm_dtype=torch.float32)
    inputs = _inputs((16, 256), torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.mtp_input(**inputs, eps=EPS)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref.mtp_input(**{k: v.double() for k, v in inputs.items()}, eps=EPS)) < 1e-2


@requires_cuda
def test_mtp_input_cuda_deterministic_empty_and_opcheck():
    inputs = _inputs((300, 1024), torch.bfloat16, "cuda")
    g = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    a = _fwd_bwd(ops.mtp_input, inputs, g)
    b = _fwd_bwd(ops.mtp_input, inputs, g)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    empty = {k: (v[:0] if k in ("embeds", "hidden") else v) for k, v in inputs.items()}
    out, grads = _fwd_bwd(ops.mtp_input, empty, g[:0])
    assert out.shape == (0, 1024) and grads["eh_weight"].abs().sum() == 0
    torch.library.opcheck(torch.ops.ringkern.mtp_input.default,
                          (*(v.requires_grad_() for v in _inputs((8, 64), torch.bfloat16, "cuda").values()), EPS))
