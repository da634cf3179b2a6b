"""IcePop experiment: GRPO with correction none vs tis vs icepop under a controlled train-inference mismatch.

Every mode starts from the same SFT model and runs the same RLVR steps with the same seeds (same prompts,
same sampling noise); only ``rlvr.correction`` differs. The mismatch has two knobs:

- ``--rollout-dtype bfloat16``: the rollout engine samples from a bf16 copy of the policy (its own bf16
  matmuls and KV cache) while the trainer computes pi_train in fp32;
- ``--noise SIGMA``: Gaussian noise of std SIGMA added to the rollout's log-probs (a perturbation of
  pi_infer as the trainer sees it, so k = pi_train / pi_infer spreads by about exp(+-SIGMA)).

Outputs in ``--out-dir``: ``sft/`` (the shared starting model, trained with the demo settings unless
``--init-from`` names one), one run directory per mode with its metrics.jsonl and plots, comparison plots
``compare_<metric>.png`` (one line per mode) and ``summary.json``.

    python experiments/icepop_experiment.py --steps 40 --noise 1.0 --rollout-dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ringkern.train.demo import demo_config  # noqa: E402
from ringkern.train.logging import read_metrics  # noqa: E402
from ringkern.train.plot import plot_run, series  # noqa: E402
from ringkern.train.stages import run_rlvr, run_sft, setup  # noqa: E402

MODES = ("none", "tis", "icepop")
COMPARED = {"reward": "rollout reward", "accuracy": "rollout accuracy", "mean_abs_logp_diff": "mean |log k|",
            "kl_train_infer": "train-infer KL (k3)", "masked_low_frac": "masked low (k < alpha)",
            "masked_high_frac": "masked high (k > beta)", "clip_frac": "PPO clip fraction", "entropy": "entropy",
            "grad_norm": "grad norm"}


def shared_sft_model(out_dir: Path, overrides: list[str]) -> Path:
    """Train (once) the SFT model every mode starts from; returns its directory."""
    model_dir = out_dir / "sft" / "sft" / "model"
    if not (model_dir / "config.json").is_file():
        run_sft(setup(demo_config([f"run.out_dir={out_dir / 'sft'}", *overrides])))
    return model_dir


def run_mode(mode: str, out_dir: Path, init_from: Path, args: argparse.Namespace) -> dict:
    cfg = demo_config([f"run.out_dir={out_dir / mode}", f"model.init_from={init_from}",
                       f"model.rollout_dtype={args.rollout_dtype}", f"rlvr.correction={mode}",
                       f"rlvr.steps={args.steps}", f"rlvr.rollout_logprob_noise={args.noise}",
                       f"run.eval_every={args.eval_every}", *args.overrides])
    started = time.perf_counter()
    final = run_rlvr(setup(cfg))
    plot_run(cfg.run.out_dir)
    return {"final_heldout_accuracy": final["accuracy"], "eval_items": final["eval_items"],
            "seconds": time.perf_counter() - started}


def summarize(records: list[dict]) -> dict[str, float]:
    train = [r for r in records if r["stage"] == "rlvr" and r.get("kind") == "train"]
    out = {}
    for name in COMPARED:
        values = [r[name] for r in train if r.get(name) is not None]
        out[f"mean_{name}"] = statistics.fmean(values) if values else float("nan")
    last = train[-max(1, len(train) // 4):]
    out["reward_last_quarter"] = statistics.fmean(r["reward"] for r in last)
    return out


def compare_plots(out_dir: Path, modes: list[str]) -> list[Path]:
    records = {mode: read_metrics(out_dir / mode) for mode in modes}
    paths = []
    for name, label in {**COMPARED, "heldout_accuracy": "held-out accuracy (greedy)"}.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for mode in modes:
            metric, kind = ("accuracy", "eval") if name == "heldout_accuracy" else (name, "train")
            xs, ys = series(records[mode], "rlvr", metric, kind)
            ax.plot(xs, ys, marker="o" if kind == "eval" else None, markersize=3, label=mode)
        ax.set(title=label, xlabel="RL step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"compare_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/icepop_experiment")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--noise", type=float, default=1.0, help="std of the rollout log-prob perturbation")
    parser.add_argument("--rollout-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--init-from", help="SFT model to start from (default: train one with the demo settings)")
    parser.add_argument("overrides", nargs="*", help="section.field=value changes to the demo settings")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    modes = args.modes.split(",")
    init_from = Path(args.init_from) if args.init_from else shared_sft_model(out_dir, args.overrides)
    summary = {"settings": {"steps": args.steps, "noise": args.noise, "rollout_dtype": args.rollout_dtype,
                            "init_from": str(init_from), "overrides": args.overrides}}
    for mode in modes:
        result = run_mode(mode, out_dir, init_from, args)
        summary[mode] = {**result, **summarize(read_metrics(out_dir / mode))}
        print(mode, json.dumps(summary[mode]), flush=True)
    compare_plots(out_dir, modes)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
