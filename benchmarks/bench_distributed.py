"""Throughput of a training step and of decode for a reduced-depth, full-width Ring-flash-2.0 model,
on 1 GPU (one process, no parallelism) or N GPUs (expert parallelism + FSDP2); results (2 and 4 H200s) in
benchmarks/RESULTS.md.

Model: the ring-flash-2.0 preset (H=4096, 256 experts of I=1024, top-8, vocab 157184) with --layers
decoder layers (layer 0 dense, the rest MoE), no MTP layer.
- train: fp32 master weights, bf16 autocast, sft_loss + backward + AdamW, --batch x --seq tokens per
  rank (weak scaling: N GPUs train N times the tokens of one step).
- decode: a bf16 copy, dense weights on every GPU and experts split (parallelize_for_inference), the
  Engine decoding --decode-batch sequences of --new-tokens tokens after a --prompt-len prompt (every
  rank decodes the same sequences; tokens/s per GPU divides by N).
Prints one table row per phase from rank 0 and writes $OUT/bench_distributed_<N>gpu.json when OUT is set.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python benchmarks/bench_distributed.py                          # 1 GPU
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py     # 2 GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from ringkern import Engine, RingConfig, RingFlashModel, SamplingParams
from ringkern.distributed import init_mesh, parallelize, parallelize_for_inference
from ringkern.distributed import mesh as mesh_module
from ringkern.train.common import make_optimizer


def build(layers: int, device: torch.device, dtype: torch.dtype) -> RingFlashModel:
    """Seeded alike on every rank (parallelize needs the same weights everywhere)."""
    torch.manual_seed(0)
    config = RingConfig.from_preset("ring-flash-2.0", num_hidden_layers=layers, num_nextn_predict_layers=0)
    with torch.device(device):
        return RingFlashModel(config).to(dtype)


def sync() -> None:
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def bench_train(args, device, mesh, world: int) -> dict[str, float]:
    model = parallelize(build(args.layers, device, torch.float32), mesh)
    optimizer = make_optimizer(model, 1e-5, 0.1, device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.sft_loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq * world
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
            "peak_mem_gib": peak}


def bench_decode(args, device, mesh, world: int) -> dict[str, float]:
    model = parallelize_for_inference(build(args.layers, device, torch.bfloat16), mesh)
    engine = Engine(model, max_batch=args.decode_batch, max_seq_len=args.prompt_len + args.new_tokens + 1,
                    cuda_graphs=not args.no_graphs)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(args.prompt_len)] for i in range(args.decode_batch)]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, seed=0))  # capture
    sync()
    engine.generate(prompts, params)
    stats = engine.stats
    rate = stats.decode_tokens / stats.decode_seconds
    return {"decode_tokens_per_s": rate, "decode_tokens_per_s_per_gpu": rate / world,
            "step_ms": 1e3 * stats.decode_seconds / stats.decode_steps,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (layer 0 dense, the rest MoE)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-layers", type=int, default=4)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    parser.add_argument("--skip", choices=["train", "decode"], default=None)
    args = parser.parse_args()
    mesh = init_mesh("cuda")
    device = mesh_module.local_device("cuda")
    torch.cuda.set_device(device)
    world = mesh_module.world_size()
    results = {"gpus": world, "layers": args.layers, "decode_layers": args.decode_layers}
    if args.skip != "train":
        results["train"] = bench_train(args, device, mesh, world)
    if args.skip != "decode":
        decode_args = argparse.Namespace(**{**vars(args), "layers": args.decode_layers})
        results["decode"] = bench_decode(decode_args, device, mesh, world)
    if mesh_module.is_main_process():
        for phase in ("train", "decode"):
            if phase in results:
                print(f"{world} GPU(s) {phase}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[phase].items()))
        if os.environ.get("OUT"):
            path = os.path.join(os.environ["OUT"], f"bench_distributed_{world}gpu.json")
            with open(path, "w") as f:
                json.dump(results, f, indent=2)
    mesh_module.shutdown()


if __name__ == "__main__":
    main()
