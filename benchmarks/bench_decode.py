"""Decode benchmark of ringkern.Engine; on CUDA with full-width Ring-flash-2.0 layers, on the CPU the tiny preset.

CUDA (default): RingConfig "ring-flash-2.0" cut to --layers decoder layers (4: the dense layer and three
MoE layers, about 13 GB in bf16) plus embedding and head, random bf16 weights. For each batch size, B
random prompts of --prompt-len tokens, --new-tokens greedy tokens (eos ignored). Reported per batch:

- decode ms/step of the engine (CUDA graphs) with all layers, and with the first two layers only (the same
  weights): their difference is the time of one MoE layer, so a 32-layer step is projected as
  t(L) + (32 - L) * t_moe_layer and tokens/s = B / that;
- at batch 1, the weight-bandwidth roofline: the bytes a token must read (attention, router, 8 routed +
  1 shared experts and norms per MoE layer, the dense layer, the head) over 4.3 TB/s, as a % of the
  measured step (for the measured layers and for the 32-layer projection);
- the same engine loop as plain PyTorch (no graphs, the reference router and per-expert MoE loop with
  their host syncs, as the published modeling code decodes) over --baseline-tokens steps, projected to
  32 layers the same way, and the speed ratios;
- prefill tokens/s, and at batch 1 the CUDA kernels one decode step launches.

Then the log-prob gap: B=--gap-batch sampled completions (temperature 1) from the bf16 engine, against the
training path on the same tokens (one full forward, fp32 log-softmax: ops.token_logprobs) with the same
bf16 weights and with an fp32 copy: mean/p50/p99/max of |logp_engine - logp_train| (the IcePop mismatch).

--cpu: the tiny preset (fp32) on the CPU, tokens/s at batch 1 and 8.
Prints a table; writes bench_decode.json under $OUT when it is set.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os

import torch

from ringkern import Engine, RingConfig, RingFlashModel, SamplingParams, ops
from ringkern.ops import inference, reference

BANDWIDTH = 4.3e12  # bytes/s, measured device-to-device copy on the H200 (PERF.md)
FULL_LAYERS = 32


# --------------------------------------------------------------------------------- models
def random_model(cfg: RingConfig, device: str, dtype: torch.dtype) -> RingFlashModel:
    """Random weights allocated straight on the device (no CPU copy of the big model)."""
    with torch.device("meta"):
        model = RingFlashModel(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.reset_parameters()
    return model.eval()


def first_layers(model: RingFlashModel, n: int) -> RingFlashModel:
    """A model sharing ``model``'s weights that keeps its first n decoder layers (no copy)."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n
    with torch.device("meta"):
        small = RingFlashModel(cfg)
    small.model.word_embeddings, small.model.norm, small.lm_head = (model.model.word_embeddings, model.model.norm,
                                                                    model.lm_head)
    small.model.layers = torch.nn.ModuleList(list(model.model.layers[:n]))
    return small


def projected_32_layers(ms_layers: float, ms_two: float, layers: int) -> float:
    """Step time of the 32-layer model from steps with ``layers`` and with 2 layers (the extra ones are MoE)."""
    return ms_layers + (FULL_LAYERS - layers) * (ms_layers - ms_two) / (layers - 2)


def bytes_per_token(cfg: RingConfig, layers: int, elem: int = 2) -> int:
    """Weights one decode token must read at batch 1: attention, norms, router, k routed + shared experts
    per MoE layer, the dense MLP of the dense layers, the final norm and the head (embedding row ~0)."""
    H, D = cfg.hidden_size, cfg.head_dim
    attention = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D * H + cfg.num_attention_heads * D * H
    norms = 2 * H + 2 * D
    experts = (cfg.num_experts_per_tok + cfg.num_shared_experts) * 3 * H * cfg.moe_intermediate_size
    moe = attention + norms + cfg.num_experts * H + experts
    dense = attention + norms + 3 * H * cfg.intermediate_size
    n_dense = min(cfg.first_k_dense_replace, layers)
    return elem * (n_dense * dense + (layers - n_dense) * moe + H + cfg.vocab_size * H)


# ---------------------------------------------------------------------------- measuring
def decode_ms_per_step(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode wall time per step of one call (every step ends in a host sync, so nothing is in flight),
    after a short warm-up call that captures the CUDA graph of the batch size the call runs at."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    engine.generate(prompts, params)
    return 1e3 * engine.stats.decode_seconds / engine.stats.decode_steps


def kernels_per_step(engine: Engine) -> tuple[int, float, list[tuple[str, int, float]]]:
    """One eager batch-1 decode step (what the graph replays) under the profiler: (kernel launches, summed
    kernel time in ms, the ten kernels with the most total time as (name, count, ms)). Summed kernel time
    well below the graph's step time means gaps between kernels, not slow kernels, cost the step."""
    engine._decode_in.zero_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine._decode_forward(SamplingParams(temperature=0), 1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(kernels, key=lambda e: e.device_time_total, reverse=True)[:10]
    return (sum(e.count for e in kernels), sum(e.device_time_total for e in kernels) / 1e3,
            [(e.key[:90], e.count, e.device_time_total / 1e3) for e in top])


@contextlib.contextmanager
def plain_pytorch_moe():
    """Make the cached path use the reference router, per-expert loop and separate shared MLP (host syncs, as
    HF decodes)."""
    saved = ops.moe_route, inference.moe_experts, inference.moe_block
    ops.moe_route, inference.moe_experts = reference.moe_route, reference.moe_experts
    inference.moe_block = inference.moe_block_inference_reference
    try:
        yield
    finally:
        ops.moe_route, inference.moe_experts, inference.moe_block = saved


def logprob_gap(engine: Engine, models: dict[str, RingFlashModel], prompts: list[list[int]],
                new_tokens: int) -> dict[str, dict[str, float]]:
    """|engine logprob - training-path logprob| stats for sampled completions, per training model."""
    comps = engine.generate(prompts, SamplingParams(temperature=1.0, seed=0, max_new_tokens=new_tokens,
                                                    ignore_eos=True))
    engine_lp = torch.tensor([lp for c in comps for lp in c.logprobs], dtype=torch.float64)
    out = {}
    for name, model in models.items():
        train = []
        for prompt, comp in zip(prompts, comps):
            ids = torch.tensor([prompt + comp.token_ids[:-1]], device=engine.device)
            with torch.no_grad():
                hidden = model(ids, compute_logits=False, compute_mtp=False).hidden_states[0, len(prompt) - 1:]
                targets = torch.tensor(comp.token_ids, device=engine.device)
                train.append(ops.token_logprobs(hidden, model.lm_head.weight, targets).double().cpu())
        gap = (engine_lp - torch.cat(train)).abs()
        out[name] = {"tokens": gap.numel(), "mean": gap.mean().item(), "p50": gap.quantile(0.5).item(),
                     "p99": gap.quantile(0.99).item(), "max": gap.max().item()}
    return out


# -------------------------------------------------------------------------------- runs
def run_cuda(args) -> dict:
    cfg = RingConfig.from_preset("ring-flash-2.0", num_hidden_layers=args.layers)
    torch.manual_seed(0)
    model = random_model(cfg, "cuda", torch.bfloat16)
    two = first_layers(model, 2)
    max_seq_len = args.prompt_len + args.new_tokens
    gen = torch.Generator().manual_seed(0)

    def prompts(b):
        return torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist()

    result = {"device": torch.cuda.get_device_name(), "layers": args.layers, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "moe_kernels": "csrc/moe (ops.moe_experts)", "batches": []}
    for b in args.batches:
        full = Engine(model, max_batch=b, max_seq_len=max_seq_len)
        ms_full = decode_ms_per_step(full, prompts(b), args.new_tokens)
        prefill_tokens_per_s = full.stats.prefill_tokens / full.stats.prefill_seconds
        kernels, kernel_ms, top_kernels = kernels_per_step(full) if b == 1 else (None, None, None)
        del full
        short = Engine(two, max_batch=b, max_seq_len=max_seq_len)
        ms_two = decode_ms_per_step(short, prompts(b), args.new_tokens)
        del short
        ms_32 = projected_32_layers(ms_full, ms_two, args.layers)
        with plain_pytorch_moe():
            plain_ms = [decode_ms_per_step(Engine(m, max_batch=b, max_seq_len=args.prompt_len + args.baseline_tokens,
                                                  cuda_graphs=False), prompts(b), args.baseline_tokens)
                        for m in (model, two)]
        ms_plain = plain_ms[0]
        ms_plain_32 = projected_32_layers(*plain_ms, args.layers)
        row = {"batch": b, "ms_per_step": ms_full, "ms_per_step_2_layers": ms_two,
               "ms_per_moe_layer": (ms_full - ms_two) / (args.layers - 2),
               "projected_32_layer_ms": ms_32, "projected_32_layer_tokens_per_s": b * 1e3 / ms_32,
               "plain_pytorch_ms_per_step": ms_plain, "speedup_vs_plain": ms_plain / ms_full,
               "plain_projected_32_layer_tokens_per_s": b * 1e3 / ms_plain_32, "speedup_32_layers": ms_plain_32 / ms_32,
               "prefill_tokens_per_s": prefill_tokens_per_s}
        if b == 1:
            roof = 1e3 * bytes_per_token(cfg, args.layers) / BANDWIDTH
            roof_32 = 1e3 * bytes_per_token(cfg, FULL_LAYERS) / BANDWIDTH
            row.update(roofline_ms=roof, roofline_pct=100 * roof / ms_full, roofline_32_ms=roof_32,
                       roofline_32_pct=100 * roof_32 / ms_32, cuda_kernels_per_step=kernels,
                       summed_kernel_ms=kernel_ms, top_kernels=top_kernels)
        result["batches"].append(row)
        torch.cuda.empty_cache()
    engine = Engine(model, max_batch=args.gap_batch, max_seq_len=max_seq_len)
    train_models = {"bf16 training forward": model}
    if not args.no_fp32_gap:
        train_models["fp32 training forward"] = copy.deepcopy(model).float()
    result["logprob_gap"] = logprob_gap(engine, train_models, prompts(args.gap_batch), args.new_tokens)
    return result


def run_cpu(args) -> dict:
    torch.manual_seed(0)
    model = RingFlashModel(RingConfig.from_preset("tiny")).eval()
    result = {"device": "cpu", "preset": "tiny", "threads": torch.get_num_threads(), "batches": []}
    for b in (1, 8):
        engine = Engine(model, max_batch=b, max_seq_len=64 + args.cpu_new_tokens)
        prompts = torch.randint(0, model.config.vocab_size, (b, 64)).tolist()
        ms = decode_ms_per_step(engine, prompts, args.cpu_new_tokens)
        result["batches"].append({"batch": b, "ms_per_step": ms, "tokens_per_s": b * 1e3 / ms})
    return result


def print_table(result: dict) -> None:
    print(f"device: {result['device']}")
    if result["device"] == "cpu":
        for row in result["batches"]:
            print(f"  tiny preset, batch {row['batch']:3d}: {row['ms_per_step']:7.2f} ms/step, "
                  f"{row['tokens_per_s']:8.1f} tokens/s")
        return
    print(f"{result['layers']} full-width layers, prompt {result['prompt_len']}, {result['new_tokens']} new tokens, "
          f"MoE experts: {result['moe_kernels']}")
    print(f"{'batch':>5} {'ms/step':>8} {'ms/MoE layer':>12} {'32L ms':>8} {'32L tok/s':>10} "
          f"{'plain ms':>9} {'speedup':>8} {'plain 32L tok/s':>16} {'32L speedup':>12}")
    for r in result["batches"]:
        print(f"{r['batch']:5d} {r['ms_per_step']:8.3f} {r['ms_per_moe_layer']:12.3f} "
              f"{r['projected_32_layer_ms']:8.2f} {r['projected_32_layer_tokens_per_s']:10.1f} "
              f"{r['plain_pytorch_ms_per_step']:9.2f} {r['speedup_vs_plain']:7.1f}x "
              f"{r['plain_projected_32_layer_tokens_per_s']:16.1f} {r['speedup_32_layers']:11.1f}x")
        if "roofline_ms" in r:
            print(f"      batch-1 weight roofline: {r['roofline_ms']:.3f} ms for {result['layers']} layers "
                  f"({r['roofline_pct']:.0f}% achieved); 32 layers {r['roofline_32_ms']:.2f} ms "
                  f"({r['roofline_32_pct']:.0f}% of the projection); {r['cuda_kernels_per_step']} kernels per step "
                  f"summing to {r['summed_kernel_ms']:.3f} ms (eager, profiled); most time:")
            for name, count, ms in r["top_kernels"]:
                print(f"        {ms:7.3f} ms {count:4d}x {name}")
        print(f"      prefill {r['prefill_tokens_per_s']:.0f} tokens/s")
    for name, g in result["logprob_gap"].items():
        print(f"|logp gap| bf16 engine vs {name} over {g['tokens']} sampled tokens: mean {g['mean']:.2e} "
              f"p50 {g['p50']:.2e} p99 {g['p99']:.2e} max {g['max']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny preset on the CPU")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--baseline-tokens", type=int, default=32, help="decode steps of the plain PyTorch loop")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    parser.add_argument("--gap-batch", type=int, default=8)
    parser.add_argument("--no-fp32-gap", action="store_true", help="skip the fp32 copy (4 layers: 26 GB)")
    parser.add_argument("--cpu-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --cpu for the tiny preset on the CPU")
    if not args.cpu and args.layers < 3:
        raise SystemExit("--layers: need >= 3 (the per-layer time is the 2-layer vs L-layer difference)")
    result = run_cpu(args) if args.cpu else run_cuda(args)
    print_table(result)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        path = os.path.join(os.environ["OUT"], "bench_decode.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
