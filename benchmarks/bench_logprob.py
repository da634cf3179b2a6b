"""Benchmark of the fused log-prob ops at the RL trainer's shape (H=4096, V=157184, bf16).

For each T: ``icepop_policy_loss`` forward+backward (grad_weight into an fp32 buffer, and returned in bf16),
the same with the weight-gradient GEMMs on cuBLAS instead of the CUTLASS kernel,
``token_logprobs`` forward alone, the eager PyTorch reference (where it fits in memory) and Cut
Cross-Entropy / Liger when importable. Times are medians over CUDA-event-timed repeats on fresh random
inputs; TFLOP/s counts 6*T*H*V for forward+backward and 2*T*H*V for the forward; "extra" memory is the
peak allocated beyond inputs, outputs and gradient tensors. Prints a table last; writes JSON to
$OUT/bench_logprob.json when OUT is set.

    python benchmarks/bench_logprob.py [--tokens 4096,16384,65536] [--reps 10]
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from ringkern import ops
from ringkern.ops import reference as ref
from timing import median_ms

GEMM_CEILING_TFLOPS = 758.0  # bf16 8192^3 cuBLAS GEMM on the lent H200 (shared/PERF.md)
GIB = 1024 ** 3


def extra_peak_gib(fn, kept_bytes: int, x: dict | None = None) -> float:
    """Peak memory of one fn() call beyond what was allocated before it and the kept_bytes it returns
    (outputs and gradients); x's gradients are freed first so that they are not counted twice."""
    if x is not None:
        x["hidden"].grad, x["weight"].grad = None, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - kept_bytes) / GIB


def make_inputs(T: int, H: int, V: int) -> dict:
    """Fresh random bf16 inputs; old log-probs near the current policy so ratios and IcePop weights are live."""
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda") * (2.0 / math.sqrt(H))).to(torch.bfloat16)
    targets = torch.randint(0, V, (T,), device="cuda")
    with torch.no_grad():
        logp = ops.token_logprobs(hidden, weight, targets)
    old = logp + 0.1 * torch.randn(T, device="cuda")
    rollout = old - 0.3 * torch.randn(T, device="cuda")
    seq_len = 1024
    cu = torch.arange(0, T + 1, seq_len, device="cuda", dtype=torch.int32)
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), targets=targets, old=old,
                rollout=rollout, advantages=torch.randn(T, device="cuda"),
                mask=torch.rand(T, device="cuda") < 0.9, cu=cu)


def policy_args(x: dict) -> tuple:
    return x["hidden"], x["weight"], x["targets"], x["old"], x["rollout"], x["advantages"], x["mask"], x["cu"]


def loss_step(impl, x: dict, **kw):
    """One forward+backward of impl; returns a function for the timers."""
    def step():
        x["hidden"].grad, x["weight"].grad = None, None
        loss, _ = impl(*policy_args(x), **kw)
        loss.backward()
    return step


def bench_fused(x: dict, reps: int, flops: float) -> dict:
    T, H = x["hidden"].shape
    V = x["weight"].shape[0]
    buffer = torch.zeros(V, H, device="cuda", dtype=torch.float32)
    fused_buffer = loss_step(ops.icepop_policy_loss, x, grad_weight_buffer=buffer)
    fused = loss_step(ops.icepop_policy_loss, x)
    out = {}
    out["fused_ms"] = median_ms(fused_buffer, reps)
    out["fused_extra_gib"] = extra_peak_gib(fused_buffer, T * H * 2, x)
    out["fused_bf16_grad_ms"] = median_ms(fused, reps)
    out["fused_bf16_grad_extra_gib"] = extra_peak_gib(fused, T * H * 2 + V * H * 2, x)
    out["fused_tflops"] = flops / out["fused_ms"] / 1e9
    os.environ["RINGKERN_LOGPROB_CUTLASS"] = "0"  # the weight-gradient GEMMs on cuBLAS instead
    out["fused_cublas_grad_weight_ms"] = median_ms(fused_buffer, reps)
    del os.environ["RINGKERN_LOGPROB_CUTLASS"]
    with torch.no_grad():
        fwd = lambda: ops.token_logprobs(x["hidden"], x["weight"], x["targets"])  # noqa: E731
        out["logprobs_fwd_ms"] = median_ms(fwd, reps)
        out["logprobs_fwd_extra_gib"] = extra_peak_gib(fwd, 0)
        for name, key, value in (("chunked", "RINGKERN_LOGPROB_STATS_GEMM", "0"),  # the other forward paths
                                 ("cooperative", "RINGKERN_LOGPROB_STATS_TILE", "cooperative")):
            os.environ[key] = value
            out[f"logprobs_fwd_{name}_ms"] = median_ms(fwd, reps)
            del os.environ[key]
    out["logprobs_fwd_tflops"] = flops / 3 / out["logprobs_fwd_ms"] / 1e9
    return out


def bench_eager(x: dict, reps: int) -> dict:
    T, H = x["hidden"].shape
    V = x["weight"].shape[0]
    free = torch.cuda.mem_get_info()[0]
    if 2.5 * 38.4 * GIB * T / 16384 > free:  # PERF.md: 38.4 GiB at T=16384, plus allocator slack
        return {"eager_skipped": "does not fit in memory"}
    step = loss_step(ref.icepop_policy_loss, x)
    return {"eager_ms": median_ms(step, max(3, reps // 2)),
            "eager_extra_gib": extra_peak_gib(step, T * H * 2 + V * H * 2, x)}


def bench_cce(x: dict, reps: int) -> dict:
    """Cut Cross-Entropy (reduction none) for the per-token log-probs, then the same IcePop loss."""
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as err:
        return {"cce_skipped": f"not importable ({err.__class__.__name__})"}

    def impl(hidden, weight, targets, old, rollout, adv, mask, cu, **kw):
        logp = -cce(hidden, weight, targets, reduction="none").float()
        return icepop_from_logprobs(logp, old, rollout, adv, mask)

    step = loss_step(impl, x)
    return {"cce_ms": median_ms(step, max(3, reps // 2))}


def icepop_from_logprobs(logp, old, rollout, adv, mask, alpha=0.5, beta=5.0, eps=0.2):
    """The IcePop token-mean loss from per-token log-probs (for peers that only produce log-probs)."""
    k = (old - rollout).exp()
    corr = torch.where((k >= alpha) & (k <= beta), k, torch.zeros_like(k))
    ratio = (logp - old).exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    terms = torch.where(mask, corr * surrogate, torch.zeros_like(surrogate))
    return -terms.sum() / mask.sum().clamp_min(1), {}


def bench_liger(x: dict, reps: int) -> dict:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as err:
        return {"liger_skipped": f"not importable ({err.__class__.__name__})"}
    T, seq = x["hidden"].shape[0], 1024
    B = T // seq
    # compiled=False: torch.compile's warm-up would not fit in the device time of one benchmark call.
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False)

    def impl(hidden, weight, targets, old, rollout, adv, mask, cu, **kw):
        out = loss_fn(hidden.view(B, seq, -1), weight, targets.view(B, seq), mask.view(B, seq).int(), adv[::seq],
                      old_per_token_logps=old.view(B, seq), vllm_is_ratio=(old - rollout).exp().view(B, seq))
        return out[0] if isinstance(out, tuple) else out, {}

    try:
        step = loss_step(impl, x)
        return {"liger_ms": median_ms(step, max(3, reps // 4), warmup=1)}
    except Exception as err:  # a peer's API drift must not sink our numbers
        return {"liger_skipped": f"failed: {err.__class__.__name__}: {str(err)[:120]}"}


def sweep_chunking(x: dict, reps: int, configs: str) -> dict:
    """Fused loss time (grad_weight into the fp32 buffer) under other chunk plans: ';'-separated configs of
    ','-separated KEY=VALUE settings of RINGKERN_LOGPROB_KEY (BF16_LOGITS, MAX_CHUNK_ROWS, CUTLASS, ...)."""
    T, H = x["hidden"].shape
    buffer = torch.zeros(x["weight"].shape[0], H, device="cuda", dtype=torch.float32)
    step = loss_step(ops.icepop_policy_loss, x, grad_weight_buffer=buffer)
    times = {}
    for config in configs.split(";"):
        env = {f"RINGKERN_LOGPROB_{kv.split('=')[0]}": kv.split("=")[1] for kv in config.split(",")}
        os.environ.update(env)
        times[config] = {"ms": median_ms(step, reps), "extra_gib": extra_peak_gib(step, T * H * 2, x)}
        for key in env:
            del os.environ[key]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16384,4096,65536")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=157184)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--peers", default="eager,cce,liger")
    parser.add_argument("--sweep", default="BF16_LOGITS=0;STATS_CHUNK_ROWS=4096;MAX_CHUNK_ROWS=2048",
                        help="at T=16384, also time the fused loss under these chunk plans (see sweep_chunking)")
    args = parser.parse_args()
    H, V = args.hidden, args.vocab
    peers = set(args.peers.split(","))
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "H": H, "V": V, "rows": []}
    for T in (int(t) for t in args.tokens.split(",")):
        torch.manual_seed(T)
        x = make_inputs(T, H, V)
        flops = 6.0 * T * H * V
        row = {"T": T, "floor_ms": flops / GEMM_CEILING_TFLOPS / 1e9, **bench_fused(x, args.reps, flops)}
        if T == 16384 and args.sweep:
            row["chunking_sweep"] = sweep_chunking(x, args.reps, args.sweep)
        if "eager" in peers:
            row.update(bench_eager(x, args.reps))
        if "cce" in peers and T <= 16384:
            row.update(bench_cce(x, args.reps))
        if "liger" in peers and T <= 16384:
            row.update(bench_liger(x, args.reps))
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        del x
        torch.cuda.empty_cache()
    print_table(results)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_logprob.json"), "w") as f:
            json.dump(results, f, indent=1)


def print_table(results: dict) -> None:
    print(f"\n{results['gpu']}, torch {results['torch']}, H={results['H']}, V={results['V']}, bf16; "
          f"% = of {GEMM_CEILING_TFLOPS:.0f} TFLOP/s")
    print(f"{'T':>6} | {'icepop f+b ms':>13} | {'TFLOP/s':>7} | {'%':>4} | {'cuBLAS dW ms':>12} | {'extra GiB':>9} | "
          f"{'bf16-grad ms':>12} | "
          f"{'extra GiB':>9} | {'logp fwd ms':>11} | {'%':>4} | {'eager ms':>8} | {'ratio':>5} | {'eager GiB':>9} | "
          f"{'CCE ms':>7} | {'Liger ms':>8}")
    for r in results["rows"]:
        eager = r.get("eager_ms")
        print(f"{r['T']:>6} | {r['fused_ms']:>13.1f} | {r['fused_tflops']:>7.0f} | "
              f"{100 * r['fused_tflops'] / GEMM_CEILING_TFLOPS:>4.0f} | {r['fused_cublas_grad_weight_ms']:>12.1f} | "
              f"{r['fused_extra_gib']:>9.2f} | "
              f"{r['fused_bf16_grad_ms']:>12.1f} | {r['fused_bf16_grad_extra_gib']:>9.2f} | "
              f"{r['logprobs_fwd_ms']:>11.1f} | {100 * r['logprobs_fwd_tflops'] / GEMM_CEILING_TFLOPS:>4.0f} | "
              f"{_fmt(eager, 8)} | {_fmt(r['fused_ms'] / eager if eager else None, 5, 2)} | "
              f"{_fmt(r.get('eager_extra_gib'), 9, 2)} | {_fmt(r.get('cce_ms'), 7)} | {_fmt(r.get('liger_ms'), 8)}")


def _fmt(value, width: int, digits: int = 1) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


if __name__ == "__main__":
    main()
