"""Speculative decoding benchmark: an MTP head that has learned, its acceptance rate and the speedup.

(a) The model: the demo's tiny-preset model (configs/demo.yaml: the ``tiny`` preset shrunk, one MTP layer)
    trained with the demo's SFT on worked ``basic_arithmetic`` solutions (``sft_loss`` includes the MTP
    loss, so the MTP head learns to draft), for --sft-steps steps; or loaded from --model. --save keeps it
    with its held-out prompt ids, so a machine without reasoning-gym can run --model on it.
    The draft costs about one MoE layer per step: with the demo's 4 decoder layers that is a third of the
    main model (Ring-flash-2.0: 1 of 33 layers), which caps the d=1 speedup near (1 + acceptance) / 1.4;
    --layers trains a deeper main model to show the regime of the real one.
(b) Decoding held-out chat prompts (the task's held-out split) at each batch size: plain decoding against
    ``Engine(speculative_tokens=d)`` for each d, greedy and sampled (temperature 1), --new-tokens tokens
    per sequence with eos honoured. Reported: decode tokens/s (decode tokens over decode seconds, after a
    warm-up call that also captures the CUDA graphs), the speedup over plain, the acceptance rate and
    committed tokens per sequence and verify step; greedy rows also check that the tokens equal plain's.

Runs on CUDA when present (bf16 weights with --bf16), else on the CPU with one thread. Prints a table;
writes bench_speculative.json under $OUT when it is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ringkern import Engine, RingFlashModel, SamplingParams
from ringkern.rewards import worked_solution
from ringkern.tokenizer import build_tiny_tokenizer
from ringkern.train.common import build_model
from ringkern.train.demo import demo_config
from ringkern.train.evaluate import chat_prompt_ids
from ringkern.train.sft import tokenize_examples, train_sft
from ringkern.train.stages import setup


PROMPTS_FILE = "bench_prompts.json"  # the held-out prompt ids, saved beside a --save'd model


def trained_model(args, device: torch.device):
    """(model, tokenizer, held-out prompt ids): the demo's SFT on the demo task, or --model loaded."""
    if args.model and (Path(args.model) / PROMPTS_FILE).exists():  # saved by --save: no task data needed
        prompts = json.loads((Path(args.model) / PROMPTS_FILE).read_text())
        model = RingFlashModel.from_pretrained(args.model, dtype=torch.float32, device=device)
        return model, None, prompts
    with tempfile.TemporaryDirectory() as out_dir:
        overrides = [f"run.out_dir={out_dir}", f"sft.steps={args.sft_steps}", f"run.device={device.type}",
                     f"run.threads={args.threads}", "run.progress=false"]
        if args.layers:
            overrides.append(f"model.overrides.num_hidden_layers={args.layers}")
        cfg = demo_config(overrides)
        s = setup(cfg, tokenizer=build_tiny_tokenizer())
        prompts = chat_prompt_ids(s.tokenizer, s.held_out.problems)
        if args.model:
            return RingFlashModel.from_pretrained(args.model, dtype=torch.float32, device=device), s.tokenizer, prompts
        pairs = [(p.prompt, worked_solution(p)) for p in s.train.problems[: cfg.sft.num_examples]]
        examples = tokenize_examples(pairs, s.tokenizer, cfg.model.max_seq_len)
        model = build_model(cfg, "sft", device)
        started = time.perf_counter()
        history = train_sft(model, examples, cfg.sft, out_dir=Path(out_dir) / "sft", run_dir=Path(out_dir),
                            seed=cfg.run.seed, pad_id=s.tokenizer.pad_token_id, device=device, progress=False)
        last = history[-1]
        print(f"SFT: {args.sft_steps} steps in {time.perf_counter() - started:.0f} s; last lm_loss "
              f"{last['lm_loss']:.3f}, mtp_loss_1 {last['mtp_loss_1']:.3f}")
        if args.save:
            model.save_pretrained(args.save, tokenizer=s.tokenizer)
            (Path(args.save) / PROMPTS_FILE).write_text(json.dumps(prompts))
        return model, s.tokenizer, prompts


def measure(model, prompts, params, batch: int, drafts: list[int], max_seq_len: int, repeats: int) -> dict[int, dict]:
    """Decode ``prompts`` on ``batch`` rows, plain (d=0) and with each d of ``drafts``; the engines take turns
    ``repeats`` times (so a load change on a shared machine hits them alike) and the median speed counts.
    Returns d -> {tokens_per_s, acceptance, tokens_per_step, token_ids}."""
    engines = {d: Engine(model, max_batch=batch, max_seq_len=max_seq_len, speculative_tokens=d) for d in [0] + drafts}
    speeds: dict[int, list[float]] = {d: [] for d in engines}
    results = {}
    for d, engine in engines.items():
        engine.generate(prompts[:batch], params)  # warm-up (and CUDA graph capture of every bucket used)
    for _ in range(repeats):
        for d, engine in engines.items():
            completions = engine.generate(prompts, params)
            s = engine.stats
            speeds[d].append(s.decode_tokens / s.decode_seconds)
            results[d] = {"acceptance": s.acceptance_rate, "tokens_per_step": s.tokens_per_step,
                          "token_ids": [c.token_ids for c in completions]}
    for d in engines:
        results[d]["tokens_per_s"] = statistics.median(speeds[d])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="load this trained model instead of training one")
    parser.add_argument("--save", help="save the trained model here")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--layers", type=int, help="decoder layers of the trained model (default: the demo's 4); "
                        "the draft costs one MoE layer, so deeper models gain more")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--drafts", default="1,2", help="speculative_tokens values to compare with plain")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts-per-batch", type=int, default=2, help="prompts decoded = this x batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="decode with bf16 weights (CUDA)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per engine (median)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    model, tokenizer, prompts = trained_model(args, device)
    model = model.to(torch.bfloat16 if args.bf16 else torch.float32).eval()
    max_seq_len = max(len(p) for p in prompts) + args.new_tokens + 1
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"device: {where}; model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{model.config.num_hidden_layers} layers + {model.config.num_nextn_predict_layers} MTP, "
          f"{'bf16' if args.bf16 else 'fp32'}")
    rows = []
    drafts = [int(x) for x in args.drafts.split(",")]
    print(f"{'mode':<8}{'batch':>6}{'d':>4}{'tokens/s':>11}{'speedup':>9}{'accept':>8}{'tok/step':>9}"
          f"{'same as plain':>15}", flush=True)
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        params = SamplingParams(temperature=temperature, max_new_tokens=args.new_tokens, seed=0)
        for batch in (int(b) for b in args.batches.split(",")):
            batch_prompts = [prompts[i % len(prompts)] for i in range(batch * args.prompts_per_batch)]
            results = measure(model, batch_prompts, params, batch, drafts, max_seq_len, args.repeats)
            plain = results[0]
            plain_ids = plain["token_ids"]
            for d, r in results.items():
                same = r.pop("token_ids") == plain_ids
                row = {"mode": mode, "batch": batch, "d": d, **r, "speedup": r["tokens_per_s"] / plain["tokens_per_s"]}
                if d:
                    row["same_as_plain"] = same
                rows.append(row)
                print(f"{mode:<8}{batch:>6}{d:>4}{r['tokens_per_s']:>11.1f}{row['speedup']:>9.2f}"
                      + (f"{r['acceptance']:>8.3f}{r['tokens_per_step']:>9.2f}"
                         f"{(str(same) if mode == 'greedy' else '-'):>15}" if d else f"{'':>8}{1.0:>9.2f}"), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_speculative.json").write_text(json.dumps({"device": where, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
