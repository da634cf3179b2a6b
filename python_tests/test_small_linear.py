"""The decode-sized projection kernel (csrc/linear/small_linear.cu) against its fp32 contract; CUDA tests skip
on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from ringkern.ops import inference


def _inputs(T, K, N, device, residual=True):
    x = torch.randn(T, K, device=device).bfloat16()
    w = (torch.randn(N, K, device=device) / K ** 0.5).bfloat16()
    r = torch.randn(T, N, device=device).bfloat16() if residual else None
    return x, w, r


def _rel_err(got, exact):
    return ((got.double() - exact.double()).norm() / exact.double().norm()).item()


def test_linear_on_cpu_is_linear_plus_residual():
    x, w, r = _inputs(3, 256, 32, "cpu")
    assert torch.equal(inference.linear(x, w, r), r + F.linear(x, w))
    assert torch.equal(inference.linear(x, w), F.linear(x, w))
    exact = x.float() @ w.float().t() + r.float()
    assert torch.equal(torch.ops.ringkern.small_linear(x, w, r), exact.bfloat16())


@requires_cuda
@pytest.mark.parametrize("T", [1, 3, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("K,N", [(128, 16), (512, 48), (4096, 5120)])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_small_linear_matches_fp32(T, K, N, residual):
    x, w, r = _inputs(T, K, N, "cuda", residual)
    got = torch.ops.ringkern.small_linear(x, w, r)
    exact = x.double() @ w.double().t() + (0 if r is None else r.double())
    eager = F.linear(x, w) + (0 if r is None else r)  # bf16 eager: two roundings with a residual
    assert got.shape == (T, N) and got.dtype == torch.bfloat16
    assert _rel_err(got, exact) <= 2 * _rel_err(eager, exact) + 1e-6
    assert torch.equal(got, torch.ops.ringkern.small_linear(x, w, r))  # deterministic


@requires_cuda
def test_cuda_linear_routes_by_size_and_keeps_leading_dims():
    x, w, r = _inputs(4, 256, 64, "cuda")
    got = inference.linear(x.view(2, 2, 256), w, r.view(2, 2, 64))
    assert got.shape == (2, 2, 64)
    assert torch.equal(got.view(4, 64), torch.ops.ringkern.small_linear(x, w, r))
    big, _, big_r = _inputs(33, 256, 64, "cuda")  # past 32 rows: cuBLAS
    assert torch.equal(inference.linear(big, w, big_r), big_r + F.linear(big, w))


@requires_cuda
def test_cuda_small_linear_graph_replay():
    x, w, r = _inputs(2, 512, 32, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.ringkern.small_linear(x, w, r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.ringkern.small_linear(x, w, r)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, torch.ops.ringkern.small_linear(x, w, r))


@requires_cuda
@pytest.mark.parametrize("case,name", [
    ("rows", "x"), ("k", "x"), ("n", "weight"), ("dtype", "weight"), ("residual", "residual"),
])
def test_cuda_small_linear_bad_arguments_name_them(case, name):
    x, w, r = _inputs(2, 256, 32, "cuda")
    if case == "rows":
        x = torch.randn(33, 256, device="cuda").bfloat16()
        r = None
    elif case == "k":
        x, w = x[:, :200].contiguous(), w[:, :200].contiguous()
        r = None
    elif case == "n":
        w, r = w[:24].contiguous(), None
    elif case == "dtype":
        w = w.float()
    else:
        r = r[:, :16].contiguous()
    with pytest.raises(RuntimeError, match=name):
        torch.ops.ringkern.small_linear(x, w, r)
