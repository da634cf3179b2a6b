"""The ``ringkern`` command: ``info`` (what this build has), ``demo`` (the tiny model end to end: SFT,
RLVR with IcePop, RLHF), ``train`` and ``plot`` (:mod:`ringkern.train`), ``generate`` (stream one
completion) and ``chat`` (an interactive conversation), the last two through :class:`ringkern.Engine`
with a checkpoint (``--model PATH``) or a preset's random weights."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def cmd_info(_: argparse.Namespace) -> int:
    from . import __version__, _C

    ops = sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("ringkern::"))
    print(f"ringkern {__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"CUDA kernels compiled in: {'yes' if _C.with_cuda else 'no'}"
          + (f" (archs {_C.cuda_archs}; CUTLASS kernels: {'yes' if _C.with_cutlass else 'no, cuBLAS instead'})"
             if _C.with_cuda else ""))
    print(f"ops: {', '.join(ops)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: tokenizer, SFT, RLVR with IcePop and RLHF on a tiny model from nothing, then a table."""
    from .train.demo import demo_config, run_demo

    overrides = [f"run.out_dir={args.out_dir}", f"run.seed={args.seed}", *args.overrides]
    print(run_demo(demo_config(overrides)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``ringkern train --config X.yaml --stage sft|rlvr|rlhf|all [section.field=value ...]``."""
    from .train import load_config, run_stages

    from .distributed.mesh import is_main_process, shutdown

    cfg = load_config(args.config, [*args.overrides, *(["run.resume=true"] if args.resume else [])])
    summaries = run_stages(cfg, args.stage)
    if is_main_process():
        for stage, summary in summaries.items():
            print(f"{stage}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    shutdown()  # under torchrun: tear the process group down cleanly (nothing to do for one process)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def load_for_generation(args: argparse.Namespace):
    """(model, tokenizer, device) from --model PATH, or --preset with random weights (tiny tokenizer)."""
    from . import RingConfig, RingFlashModel
    from .tokenizer import RingTokenizer, load_tiny_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model:
        dtype = dtype or (None if device.type == "cuda" else torch.float32)
        model = RingFlashModel.from_pretrained(args.model, dtype=dtype, device=device)
        return model, RingTokenizer.from_file(args.model), device
    if args.preset != "tiny":
        raise SystemExit(f"--preset {args.preset}: only 'tiny' has a shipped tokenizer; pass --model PATH")
    torch.manual_seed(args.seed)
    model = RingFlashModel(RingConfig.from_preset("tiny")).to(device=device, dtype=dtype or torch.float32)
    print("[ringkern] preset 'tiny' with random weights and the tiny tokenizer (no checkpoint): "
          "the text is noise", file=sys.stderr)
    return model, load_tiny_tokenizer(), device


def sampling_params(args: argparse.Namespace, tokenizer):
    """SamplingParams from the command line; stops at eos and <|role_end|>."""
    from .engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          seed=args.seed, max_new_tokens=args.max_new_tokens,
                          stop_token_ids=(tokenizer.eos_token_id, tokenizer.role_end_token_id))


def stream_completion(engine, tokenizer, prompt_ids: list[int], params) -> list[int]:
    """Generate one completion, printing its text as it grows, then a tokens/s line; returns its token ids."""
    tokens: list[int] = []
    printed = ""
    start = time.perf_counter()
    for _, token, _ in engine.stream([prompt_ids], params):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed):], end="", flush=True)
            printed = text
    elapsed = time.perf_counter() - start
    print(f"\n[{len(tokens)} tokens in {elapsed:.2f} s: {len(tokens) / elapsed:.1f} tokens/s, "
          f"prompt {len(prompt_ids)} tokens, {engine.device}]", flush=True)
    return tokens


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Engine

    model, tokenizer, device = load_for_generation(args)
    prompt_ids = (tokenizer.encode(args.prompt) if args.no_chat_template
                  else tokenizer.encode_chat([{"role": "user", "content": args.prompt}]))
    max_seq_len = min(len(prompt_ids) + args.max_new_tokens, model.config.max_position_embeddings)
    engine = Engine(model, max_batch=1, max_seq_len=max_seq_len, device=device, tokenizer=tokenizer)
    stream_completion(engine, tokenizer, prompt_ids, sampling_params(args, tokenizer))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Read user turns from stdin (one per line; /exit or end of input stops) and stream the replies."""
    from .engine import Engine

    model, tokenizer, device = load_for_generation(args)
    engine = Engine(model, max_batch=1, max_seq_len=min(args.max_seq_len, model.config.max_position_embeddings),
                    device=device, tokenizer=tokenizer)
    params = sampling_params(args, tokenizer)
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt_ids = tokenizer.encode_chat(messages)
        if len(prompt_ids) >= engine.max_seq_len:
            print(f"[conversation is {len(prompt_ids)} tokens, past --max-seq-len {engine.max_seq_len}: starting over]")
            messages = messages[-1:]
            prompt_ids = tokenizer.encode_chat(messages)[-(engine.max_seq_len - 1):]
        reply = stream_completion(engine, tokenizer, prompt_ids, params)
        messages.append({"role": "assistant", "content": tokenizer.decode(
            [t for t in reply if t not in params.stop_token_ids])})


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    source.add_argument("--preset", help="random weights of a preset (only 'tiny': it ships a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: the checkpoint's on CUDA, float32 on the CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, compiled CUDA archs, available ops").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="tiny model from nothing: SFT, RLVR with IcePop, RLHF, a results table")
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("overrides", nargs="*", help="section.field=value changes to the demo settings")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="run training stages from a YAML config")
    train.add_argument("--config", help="YAML file (sections run, model, task, sft, rlvr, reward_model, rlhf)")
    train.add_argument("--stage", default="all", choices=["sft", "rlvr", "rlhf", "all"])
    train.add_argument("--resume", action="store_true", help="continue each stage from its last training state")
    train.add_argument("overrides", nargs="*", help="section.field=value, e.g. rlvr.correction=tis")
    train.set_defaults(func=cmd_train)
    plot = sub.add_parser("plot", help="PNG plots of a run's metrics into RUN_DIR/plots")
    plot.add_argument("run_dir")
    plot.set_defaults(func=cmd_plot)
    gen = sub.add_parser("generate", help="stream a completion of --prompt (chat template unless told not to)")
    _add_generation_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--no-chat-template", action="store_true", help="encode --prompt as raw text")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat: one user turn per stdin line, /exit to quit")
    _add_generation_args(chat)
    chat.add_argument("--max-seq-len", type=int, default=4096, help="prompt plus reply, in tokens")
    chat.set_defaults(func=cmd_chat)
    args = parser.parse_args(argv)
    return args.func(args)
