"""CUDA RMSNorm kernel vs the float64 reference; the model on CUDA vs the CPU. Skipped without a GPU."""
import pytest
import torch

from conftest import requires_cuda
from ringkern import RingConfig, RingFlashModel, ops
from ringkern.ops import reference as ref


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 128), (37, 4096), (3, 5, 1000), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_cuda_matches_reference(shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(shape[-1], device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(shape, device="cuda", dtype=dtype)
    y = ops.rms_norm(x, w, 1e-6)
    y.backward(g)
    y64 = ref.rms_norm(x.double(), w.double(), 1e-6)
    gx64, gw64 = ref.rms_norm_backward(g.double(), x.double(), w.double(), 1e-6)
    same_dtype = ref.rms_norm(x.detach(), w.detach(), 1e-6)  # eager PyTorch in the input dtype
    tol = 1e-6 if dtype == torch.float32 else 2 * max(_rel(same_dtype, y64), 4e-3)
    assert _rel(y, y64) <= tol
    assert _rel(x.grad, gx64) <= max(tol, 1e-5)
    assert _rel(w.grad, gw64) <= max(tol, 1e-5)


@requires_cuda
def test_rms_norm_cuda_errors_name_the_argument():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="'weight'"):
        torch.ops.ringkern.rms_norm(x, torch.ones(7, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="'x'.*contiguous"):
        torch.ops.ringkern.rms_norm(x.t(), torch.ones(4, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="'weight'.*device"):
        torch.ops.ringkern.rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="'x'.*dtype"):
        torch.ops.ringkern.rms_norm(x.double(), torch.ones(8, device="cuda"), 1e-6)


@requires_cuda
def test_rms_norm_cuda_deterministic_and_opcheck():
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    a = torch.ops.ringkern.rms_norm_backward(g, x, w, 1e-6)
    b = torch.ops.ringkern.rms_norm_backward(g, x, w, 1e-6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.library.opcheck(torch.ops.ringkern.rms_norm.default, (x.requires_grad_(), w, 1e-6))


@requires_cuda
def test_model_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = RingFlashModel(RingConfig.from_preset("tiny", vocab_size=97))
    ids = torch.randint(0, 97, (2, 13))
    ref_out = cpu(ids)
    gpu = RingFlashModel(cpu.config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    out = gpu(ids.cuda(), expert_ids={k: v.cuda() for k, v in ref_out.expert_ids.items()})
    assert _rel(out.logits.cpu(), ref_out.logits) < 1e-4
    assert _rel(out.mtp_logits[0].cpu(), ref_out.mtp_logits[0]) < 1e-4  # through the fused MTP input op
