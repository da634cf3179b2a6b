"""The split-KV decode attention kernel (csrc/attention) against its reference; CUDA tests skip on the CPU."""
import copy

import pytest
import torch

from conftest import requires_cuda
from ringkern import RingConfig, RingFlashModel
from ringkern.model import KVCache
from ringkern.ops import inference


def _naive(q, k_cache, v_cache, positions):
    """Per row and query, softmax over cache positions <= its own, float64."""
    B, Hq, T, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = int(positions[b, t]) + 1
            for h in range(Hq):
                scores = k_cache[b, h // G, :n].double() @ q[b, h, t].double() / D ** 0.5
                out[b, h, t] = torch.softmax(scores, 0) @ v_cache[b, h // G, :n].double()
    return out


def _case(B, Hq, Hkv, T, S, D, rows=None, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = rows or B
    q = torch.randn(B, Hq, T, D, generator=g).to(device, dtype)
    k = torch.randn(rows, Hkv, S, D, generator=g).to(device, dtype)
    v = torch.randn(rows, Hkv, S, D, generator=g).to(device, dtype)
    last = torch.randint(T - 1, S, (B,), generator=g)
    last[0] = S - 1  # one row uses the whole cache
    if B > 1:
        last[1] = T - 1  # one row at its very first positions
    positions = (last.unsqueeze(1) - torch.arange(T - 1, -1, -1)).to(device)  # [B, T], consecutive
    return q, k, v, positions


def test_reference_matches_naive():
    q, k, v, pos = _case(3, 4, 2, 2, 37, 16)
    got = torch.ops.ringkern.decode_attention(q, k, v, pos)
    torch.testing.assert_close(got.double(), _naive(q, k, v, pos), rtol=1e-5, atol=1e-5)


# S is no multiple of the kernel's 16- and 64-key tiles except where noted; G * T covers 1 to 32 query rows per kv
# head (one, two and four groups of 8 rows); 20001 keys cap the splits.
@requires_cuda
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,rows", [(1, 32, 4, 1, 1088, 128, 1), (3, 8, 2, 2, 200, 128, 5),
                                                  (5, 4, 4, 1, 64, 64, 5), (2, 16, 2, 2, 300, 64, 2),
                                                  (4, 8, 4, 3, 129, 256, 6), (64, 32, 4, 1, 513, 128, 64),
                                                  (1, 32, 4, 1, 1324, 128, 1), (16, 32, 4, 1, 1324, 128, 16),
                                                  (16, 8, 2, 3, 777, 128, 20), (3, 16, 4, 3, 999, 64, 3),
                                                  (16, 8, 1, 3, 333, 64, 16), (2, 32, 1, 1, 70, 64, 2),
                                                  (1, 4, 4, 1, 1000, 256, 2), (3, 2, 1, 3, 90, 256, 3),
                                                  (1, 8, 1, 1, 20001, 128, 1), (2, 4, 2, 1, 1, 64, 2)])
def test_decode_attention_cuda_matches_reference(B, Hq, Hkv, T, S, D, rows, monkeypatch):
    monkeypatch.delenv("RINGKERN_DECODE_ATTENTION", raising=False)  # the decode step's default
    q, k, v, pos = _case(B, Hq, Hkv, T, S, D, rows, device="cuda", dtype=torch.bfloat16, seed=B * S)
    assert inference.decode_kernel_supported(q, k)
    got = torch.ops.ringkern.decode_attention(q, k[:B], v[:B], pos)
    want = _naive(q.cpu(), k[:B].cpu(), v[:B].cpu(), pos.cpu())
    eager_bf16 = inference.decode_attention_reference(q, k, v, pos).double().cpu()  # SDPA in bf16
    err, err_bf16 = (got.double().cpu() - want).abs().max().item(), (eager_bf16 - want).abs().max().item()
    assert err <= max(2 * err_bf16, 1e-2), (err, err_bf16)
    for _ in range(3):  # bitwise the same run to run
        assert torch.equal(got, torch.ops.ringkern.decode_attention(q, k[:B], v[:B], pos))


@requires_cuda
def test_decode_attention_cuda_row_with_nothing_visible_is_zero():
    q, k, v, pos = _case(3, 8, 2, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
    pos[1] = -1
    got = torch.ops.ringkern.decode_attention(q, k, v, pos)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    keep = [0, 2]
    want = _naive(q[keep].cpu(), k[keep].cpu(), v[keep].cpu(), pos[keep].cpu())
    torch.testing.assert_close(got[keep].double().cpu(), want, rtol=0, atol=2e-2)


@requires_cuda
def test_decode_attention_cuda_graph_replay_and_errors(monkeypatch):
    monkeypatch.setenv("RINGKERN_DECODE_ATTENTION", "1")
    q, k, v, pos = _case(2, 8, 2, 1, 256, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    torch.ops.ringkern.decode_attention(q, k, v, pos)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(torch.ops.ringkern.decode_attention(q, k, v, pos))
    for shift in (5, 100):  # new positions, same buffers (after 5, row 1 sees nothing)
        pos.sub_(shift)
        graph.replay()
        torch.testing.assert_close(out, torch.ops.ringkern.decode_attention(q, k, v, pos), rtol=0, atol=0)
    assert not inference.decode_kernel_supported(q[..., :32].contiguous(), k[..., :32].contiguous())
    monkeypatch.delenv("RINGKERN_DECODE_ATTENTION")
    assert inference.decode_kernel_supported(q, k)  # on by default
    monkeypatch.setenv("RINGKERN_DECODE_ATTENTION", "0")
    assert not inference.decode_kernel_supported(q, k)  # SDPA


@requires_cuda
def test_model_decode_step_uses_kernel_and_matches_masked_path(monkeypatch):
    torch.manual_seed(0)
    # Dense layers only: a bf16 rounding difference cannot flip a routing choice and grow from there.
    cfg = RingConfig.from_preset("tiny", head_dim=64, num_nextn_predict_layers=0, num_hidden_layers=2,
                                 first_k_dense_replace=2)
    model = RingFlashModel(cfg).cuda().bfloat16().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 20), device="cuda")
    calls = []
    real = torch.ops.ringkern.decode_attention

    def outputs(use_kernel, net, dtype=torch.bfloat16):
        cache = KVCache.allocate(cfg, 3, 64, dtype=dtype, device="cuda")
        monkeypatch.setattr(inference, "decode_kernel_supported", lambda q, k: use_kernel)
        with torch.no_grad():
            net(ids[:, :12], kv_cache=cache, cache_rows=torch.arange(3, device="cuda"), compute_mtp=False)
            steps = []
            for t in range(12, 20):
                pos = torch.full((3, 1), t, device="cuda")
                steps.append(net(ids[:, t:t + 1], kv_cache=cache, position_ids=pos, compute_mtp=False).logits)
        return torch.cat(steps, 1).float()

    monkeypatch.setattr(torch.ops.ringkern, "decode_attention", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    with_kernel, masked = outputs(True, model), outputs(False, model)
    assert calls, "the decode step did not call the kernel"
    exact = outputs(False, copy.deepcopy(model).float(), torch.float32)

    def err(got):
        return ((got - exact).norm() / exact.norm()).item()

    assert err(with_kernel) <= 2 * err(masked) + 1e-3
