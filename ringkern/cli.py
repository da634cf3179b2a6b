"""The ``ringkern`` command: ``info`` (what this build has) and ``demo`` (the tiny model end to end)."""
from __future__ import annotations

import argparse
import time

import torch


def cmd_info(_: argparse.Namespace) -> int:
    from . import __version__, _C

    ops = sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("ringkern::"))
    print(f"ringkern {__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"CUDA kernels compiled in: {'yes' if _C.with_cuda else 'no'}"
          + (f" (archs {_C.cuda_archs})" if _C.with_cuda else ""))
    print(f"ops: {', '.join(ops)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Tiny preset from nothing: a few SFT steps on one chat example, then greedy decoding."""
    from . import RingConfig, RingFlashModel
    from .tokenizer import load_tiny_tokenizer

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tiny_tokenizer()
    model = RingFlashModel(RingConfig.from_preset("tiny")).to(device)
    prompt_ids, response_ids = tok.format_sft_example("What is 12 + 30?", "<think>\n12 + 30 = 42\n</think>\n\n42")
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    labels = ids.clone()
    labels[:, : len(prompt_ids)] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        loss, parts = model.sft_loss(ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  lm {parts['lm_loss'].item():.4f}")
    completion = greedy_continue(model, prompt_ids, len(response_ids), tok.eos_token_id, device)
    elapsed = time.perf_counter() - start
    print(f"prompt:     {tok.decode(prompt_ids)!r}")
    print(f"completion: {tok.decode(completion)!r}  ({elapsed:.1f}s on {device})")
    return 0


@torch.no_grad()
def greedy_continue(model, prompt_ids: list[int], max_new: int, eos_id: int, device) -> list[int]:
    """Greedy decoding by full recompute (the Engine is the fast path)."""
    ids = list(prompt_ids)
    for _ in range(max_new):
        logits = model(torch.tensor([ids], device=device), compute_mtp=False).logits
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos_id:
            break
    return ids[len(prompt_ids):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, compiled CUDA archs, available ops").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="tiny-model SFT and generation from nothing")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)
