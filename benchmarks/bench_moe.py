"""Routed-expert MoE path at Ring-flash-2.0 shapes (H=4096, I=1024, E=256, top-8, 8 groups keep 4, bf16).

Times, in one process, the path from hidden states to the combined routed output, router included:
- ringkern: gate GEMM reading bf16, writing fp32 (ops.router_logits) -> ops.moe_route (fused kernel) ->
  ops.moe_experts (sync-free);
- grouped_mm: the torch._grouped_mm pipeline of shared/PERF.md (reference routing, argsort, gather,
  two grouped GEMMs, silu*up, index_add);
- loop: the per-expert loop (reference.moe_experts, HF style), small T only.
Also moe_route against its PyTorch reference, and forward+backward at T=16384.
FLOPs = 6*T*k*H*I (forward); bytes = expert weights touched (distinct experts hit) in bf16.
Ceilings: 758 TFLOP/s (cuBLAS bf16, measured) and 4.3 TB/s (device copy, measured); see shared/PERF.md.
For T <= 512 (decode sizes) the same path is also timed replayed from a CUDA graph of 10 calls, as the
engine's captured decode step runs it (no host launch gaps), against the bandwidth floor.
Prints a table; writes JSON to $OUT/bench_moe.json when OUT is set.
Usage: python benchmarks/bench_moe.py [--tokens 1 64 ...] [--reps N]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from ringkern import ops
from ringkern.ops import reference as ref
from timing import graph_ms, median_ms

H, I, E, K = 4096, 1024, 256, 8
ROUTE = dict(n_group=8, topk_group=4, top_k=K, routed_scaling_factor=2.5)
PEAK_FLOPS, PEAK_BW = 758e12, 4.3e12


EXPERT_PATHS = {
    "small": {"RINGKERN_MOE_SMALL_SLOTS": str(1 << 30)},
    "cutlass": {"RINGKERN_MOE_SMALL_SLOTS": "0", "RINGKERN_MOE_CUTLASS": "require",
                "RINGKERN_MOE_CUTLASS_TILE": "pingpong"},
    "cutlass_cooperative": {"RINGKERN_MOE_SMALL_SLOTS": "0", "RINGKERN_MOE_CUTLASS": "require",
                            "RINGKERN_MOE_CUTLASS_TILE": "cooperative"},
    "torch_grouped_mm": {"RINGKERN_MOE_SMALL_SLOTS": "0", "RINGKERN_MOE_CUTLASS": "0"},
}


def grouped_mm_experts(x, weights, expert_ids, gate_up_proj, down_proj):
    """The PERF.md baseline: argsort, gather, grouped GEMM, silu*up, grouped GEMM, weighted index_add."""
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.zeros(gate_up_proj.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x[token], gate_up_proj.transpose(1, 2), offs=offsets)
    gate, up = ref.split_gate_up(gate_up)
    y_sorted = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
    y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, token, y_sorted.float() * weights.reshape(-1)[order].unsqueeze(-1))
    return y.to(x.dtype)


def bench_moe_block(tokens: list[int], reps: int) -> list[dict]:
    """The model's MoEBlock (router, routed experts and the shared expert) with the shared expert on its side
    stream (forced at every T) vs after the routed path on the same stream: forward (no grad), and
    forward+backward at T=16384. The model takes the side stream from model.SIDE_STREAM_MIN_TOKENS tokens."""
    from ringkern import model as model_mod
    from ringkern.config import RingConfig

    block = model_mod.MoEBlock(RingConfig.from_preset("ring-flash-2.0")).cuda()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block = block.bfloat16()
    overlapped, min_tokens = model_mod.side_stream, model_mod.SIDE_STREAM_MIN_TOKENS
    model_mod.SIDE_STREAM_MIN_TOKENS = 0
    out = []
    for T in tokens:
        x = torch.randn(1, T, H, device="cuda").bfloat16()
        row = {"T": T}
        for name, stream_fn in (("side_stream", overlapped), ("sequential", lambda _: None)):
            model_mod.side_stream = stream_fn
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = median_ms(lambda: block(x), reps)
            if T == 16384:
                leaf = x.detach().requires_grad_()
                row[f"{name}_fwd_bwd_ms"] = median_ms(lambda: block(leaf)[0].backward(torch.ones_like(leaf)), reps)
        model_mod.side_stream = overlapped
        out.append(row)
        print("MoE block " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    model_mod.SIDE_STREAM_MIN_TOKENS = min_tokens
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096, 16384, 65536])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    gate_up = (torch.randn(E, 2 * I, H, device=dev) * 0.02).bfloat16()
    down = (torch.randn(E, H, I, device=dev) * 0.02).bfloat16()
    router = (torch.randn(E, H, device=dev) * 0.02).bfloat16()  # a bf16 model's gate weight
    bias = torch.zeros(E, device=dev)
    expert_bytes = (2 * I * H + H * I) * 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows, results = [], {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}

    def ours(x, atomic_combine=False):
        w, ids, _ = ops.moe_route(ops.router_logits(x, router), bias, **ROUTE)
        return ops.moe_experts(x, w, ids, gate_up, down, atomic_combine=atomic_combine)

    def baseline(x):
        w, ids, _ = ref.moe_route(x.float() @ router.float().t(), bias, **ROUTE)
        return grouped_mm_experts(x, w, ids, gate_up, down)

    def loop(x):
        w, ids, _ = ref.moe_route(x.float() @ router.float().t(), bias, **ROUTE)
        return ref.moe_experts(x, w, ids, gate_up, down)

    for T in args.tokens:
        xs = [torch.randn(T, H, device=dev).bfloat16() for _ in range(2)]
        it = iter(range(1 << 30))
        pick = lambda: xs[next(it) % len(xs)]  # noqa: E731  (rotate inputs)
        reps = args.reps if T <= 16384 else max(3, args.reps // 3)
        with torch.no_grad():
            logits = xs[0].float() @ router.float().t()
            _, ids, counts = ops.moe_route(logits, bias, **ROUTE)
            touched = int((counts > 0).sum().item())
            y_ours, y_base = ours(xs[0]), baseline(xs[0])
            agree = ((y_ours.float() - y_base.float()).norm() / y_base.float().norm()).item()
            t_ours = median_ms(lambda: ours(pick()), reps)
            # decode sizes: also as the engine runs them, replayed from a CUDA graph
            t_graph = graph_ms(lambda: ours(xs[0])) if T <= 512 else None
            t_paths = {}  # each expert path forced: the few-rows kernels (T <= 4096), the grouped GEMMs on
            for name, env in EXPERT_PATHS.items():  # CUTLASS (both tile variants) or torch._grouped_mm
                if name != "small" or T <= 4096:
                    os.environ.update(env)
                    t_paths[name] = median_ms(lambda: ours(pick()), reps)
                    for key in env:
                        del os.environ[key]
            if T >= 512:  # the opt-in atomic combine (CUTLASS grouped path)
                os.environ.update(EXPERT_PATHS["cutlass"])
                t_paths["cutlass_atomic_combine"] = median_ms(lambda: ours(pick(), atomic_combine=True), reps)
                for key in EXPERT_PATHS["cutlass"]:
                    del os.environ[key]
            t_base = median_ms(lambda: baseline(pick()), reps)
            t_loop = median_ms(lambda: loop(pick()), 3, warmup=1) if T <= 512 else None
            t_route = median_ms(lambda: ops.moe_route(logits, bias, **ROUTE), reps)
            t_route_ref = median_ms(lambda: ref.moe_route(logits, bias, **ROUTE), reps)
        flops = 6 * T * K * H * I
        nbytes = touched * expert_bytes
        floor = max(flops / PEAK_FLOPS, nbytes / PEAK_BW) * 1e3
        run = dict(T=T, ms=t_ours, tflops=flops / t_ours / 1e9, gbps=nbytes / t_ours / 1e6,
                   pct_flops=100 * flops / t_ours / 1e9 / (PEAK_FLOPS / 1e12),
                   pct_bw=100 * nbytes / t_ours / 1e6 / (PEAK_BW / 1e9), floor_ms=floor,
                   grouped_mm_ms=t_base, speedup_vs_grouped_mm=t_base / t_ours,
                   loop_ms=t_loop, route_ms=t_route, route_ref_ms=t_route_ref, graph_ms=t_graph,
                   graph_floor_ratio=t_graph / floor if t_graph else None,
                   route_speedup=t_route_ref / t_route, experts_touched=touched, rel_diff_vs_baseline=agree,
                   path_ms=t_paths)
        results["runs"].append(run)
        rows.append(run)
        print(f"T={T:6d} ours {t_ours:8.3f} ms  grouped_mm {t_base:8.3f} ms  x{t_base / t_ours:5.2f}  "
              f"{run['tflops']:6.1f} TFLOP/s ({run['pct_flops']:4.1f}%)  {run['gbps']:7.1f} GB/s "
              f"({run['pct_bw']:4.1f}%)  floor {floor:.3f} ms  route {t_route * 1e3:7.1f} us vs "
              f"{t_route_ref * 1e3:7.1f} us (x{run['route_speedup']:.1f})"
              + (f"  loop {t_loop:.2f} ms" if t_loop else "")
              + (f"  graph {t_graph:.3f} ms ({run['graph_floor_ratio']:.2f}x floor)" if t_graph else "")
              + f"  diff {agree:.1e}"
              + "".join(f"  [{k} {v:.3f} ms]" for k, v in t_paths.items()), flush=True)

    # forward + backward at T=16384: FLOPs 3x the forward
    T = 16384
    if T in args.tokens:
        params = [t.requires_grad_() for t in (gate_up, down, router)]
        x = torch.randn(T, H, device=dev).bfloat16().requires_grad_()
        grad = torch.randn(T, H, device=dev).bfloat16()

        def fwd_bwd(fn):
            y = fn(x)
            torch.autograd.grad(y, [x, *params], grad)

        t_fb = median_ms(lambda: fwd_bwd(ours), max(3, args.reps // 2))
        t_fb_base = median_ms(lambda: fwd_bwd(baseline), max(3, args.reps // 2))
        os.environ["RINGKERN_MOE_CUTLASS"] = "0"  # our path with the forward GEMMs on torch._grouped_mm
        t_fb_torch = median_ms(lambda: fwd_bwd(ours), max(3, args.reps // 2))
        del os.environ["RINGKERN_MOE_CUTLASS"]
        flops = 3 * 6 * T * K * H * I
        results["fwd_bwd"] = dict(T=T, ms=t_fb, tflops=flops / t_fb / 1e9, grouped_mm_ms=t_fb_base,
                                  speedup_vs_grouped_mm=t_fb_base / t_fb, ours_torch_grouped_mm_fwd_ms=t_fb_torch)
        print(f"fwd+bwd T={T}: ours {t_fb:.2f} ms ({flops / t_fb / 1e9:.1f} TFLOP/s), grouped_mm {t_fb_base:.2f} ms "
              f"(x{t_fb_base / t_fb:.2f}); ours with torch._grouped_mm forward GEMMs {t_fb_torch:.2f} ms", flush=True)

    # where the time goes at T=16384 (forward), from the profiler's kernel totals
    if 16384 in args.tokens:
        try:
            x = torch.randn(16384, H, device=dev).bfloat16()
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    ours(x)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
            print(table)
            results["profile_T16384"] = table
        except Exception as err:  # the profiler is a diagnostic only
            print(f"profiler unavailable: {err}")

    results["moe_block"] = bench_moe_block([t for t in args.tokens if t in (1, 64, 16384)], args.reps)

    print("\n| T | ms | TFLOP/s | % 758 | GB/s | % 4.3 TB/s | floor ms | graph ms (x floor) | grouped_mm ms "
          "| speedup | loop ms | route us | route ref us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        loop_ms = f"{r['loop_ms']:.1f}" if r["loop_ms"] else "-"
        graph = f"{r['graph_ms']:.3f} ({r['graph_floor_ratio']:.2f})" if r["graph_ms"] else "-"
        print(f"| {r['T']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['pct_flops']:.1f} | {r['gbps']:.0f} | "
              f"{r['pct_bw']:.1f} | {r['floor_ms']:.3f} | {graph} | {r['grouped_mm_ms']:.3f} "
              f"| {r['speedup_vs_grouped_mm']:.2f} | {loop_ms} | {r['route_ms'] * 1e3:.1f} | {r['route_ref_ms'] * 1e3:.1f} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_moe.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
