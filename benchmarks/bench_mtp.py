"""Fused MTP input (ops.mtp_input) vs the unfused PyTorch composition, forward+backward, bf16.

The composition: two RMSNorms (torch's F.rms_norm, and the published modeling code's eager fp32 RMSNorm),
torch.cat, nn.functional.linear; the fused op: both norms written straight into the halves of the GEMM
operand, one GEMM, and in the backward two GEMMs plus the two norm backwards reading their halves in place.
FLOPs: 3 GEMMs of 2*T*H*2H each (forward+backward). Prints a table; JSON to $OUT/bench_mtp.json if OUT is set.
Usage: python benchmarks/bench_mtp.py [--tokens 16384] [--hidden 4096] [--reps 20]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from ringkern import ops
from timing import median_ms

EPS = 1e-6
GEMM_CEILING_TFLOPS = 758.0  # bf16 cuBLAS GEMM on the lent H200 (shared/PERF.md)


def eager_rms_norm(x, weight, eps):
    """The published modeling code's RMSNorm: fp32 variance, rsqrt, scale, cast back."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def composition(norm):
    def fn(embeds, hidden, enorm_weight, hnorm_weight, eh_weight):
        return F.linear(torch.cat([norm(embeds, enorm_weight, EPS), norm(hidden, hnorm_weight, EPS)], -1), eh_weight)
    return fn


def torch_rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused(embeds, hidden, enorm_weight, hnorm_weight, eh_weight):
    return ops.mtp_input(embeds, hidden, enorm_weight, hnorm_weight, eh_weight, EPS)


def bench(fn, leaves, grad, reps):
    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    def fwd():
        with torch.no_grad():
            fn(*leaves)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return median_ms(fwd, reps), median_ms(fwd_bwd, reps), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    H = args.hidden
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, H={H}, bf16")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    print(f"{'T':>6} {'impl':<26} {'fwd ms':>8} {'f+b ms':>8} {'TFLOP/s':>8} {'peak GiB':>9} {'speedup':>8}")
    for T in args.tokens:
        torch.manual_seed(0)
        leaves = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16),
                  torch.randn(T, H, device="cuda", dtype=torch.bfloat16) * 3,
                  1 + 0.1 * torch.randn(H, device="cuda", dtype=torch.bfloat16),
                  1 + 0.1 * torch.randn(H, device="cuda", dtype=torch.bfloat16),
                  torch.randn(H, 2 * H, device="cuda", dtype=torch.bfloat16) * H ** -0.5]
        leaves = [t.requires_grad_() for t in leaves]
        grad = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        # correctness first: fused vs the torch composition on these inputs
        out, want = fused(*leaves), composition(torch_rms_norm)(*leaves)
        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
        flops = 3 * 2 * T * H * 2 * H
        impls = {"fused ops.mtp_input": fused, "unfused (F.rms_norm)": composition(torch_rms_norm),
                 "unfused (eager fp32 norm)": composition(eager_rms_norm)}
        timings = {name: bench(fn, leaves, grad, args.reps) for name, fn in impls.items()}
        fused_fb = timings["fused ops.mtp_input"][1]
        for name, (f, fb, peak) in timings.items():
            print(f"{T:>6} {name:<26} {f:>8.3f} {fb:>8.3f} {flops / fb / 1e9:>8.1f} {peak:>9.2f} {fb / fused_fb:>7.2f}x")
            results["runs"].append({"tokens": T, "impl": name, "fwd_ms": f, "fwd_bwd_ms": fb, "peak_gib": peak,
                                    "tflops": flops / fb / 1e9, "speedup_of_fused": fb / fused_fb})
        print(f"{T:>6} fused vs composition: rel. error {err:.2e}; GEMM floor f+b "
              f"{flops / GEMM_CEILING_TFLOPS / 1e9:.3f} ms")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_mtp.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
