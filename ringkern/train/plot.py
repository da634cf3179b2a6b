"""``ringkern plot RUN_DIR``: PNG plots of a run's metrics.jsonl (matplotlib, no display needed).

One figure per quantity, one line per stage, on one run-wide step axis (each stage starts where the
previous one ended): reward, accuracy (training rollouts and held-out evaluations), response length,
entropy, train-inference mismatch (mean |log pi_train - log pi_infer|, k3 KL, max probability gap), IcePop
masked fraction (low and high), PPO clip fraction, the SFT loss, and the reward model's pair accuracy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from .logging import read_metrics  # noqa: E402

# file name -> (title, y label, [(metric, record kind, label suffix)])
FIGURES: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "reward": ("Rollout reward", "mean reward", [("reward", "train", "")]),
    "accuracy": ("Accuracy", "fraction correct",
                 [("accuracy", "train", " rollouts"), ("accuracy", "eval", " held-out (greedy)")]),
    "response_length": ("Response length", "tokens", [("response_length", "train", "")]),
    "entropy": ("Policy entropy on sampled tokens", "nats", [("entropy", "train", "")]),
    "mismatch": ("Train-inference mismatch", "value",
                 [("mean_abs_logp_diff", "train", " mean |dlogp|"), ("kl_train_infer", "train", " KL (k3)"),
                  ("max_prob_gap", "train", " max |dp|")]),
    "masked_fraction": ("IcePop masked fraction", "fraction of tokens",
                        [("masked_low_frac", "train", " low (k<alpha)"), ("masked_high_frac", "train", " high (k>beta)")]),
    "clip_fraction": ("PPO clip fraction", "fraction of tokens", [("clip_frac", "train", "")]),
    "sft_loss": ("SFT loss", "loss", [("loss", "train", "")]),
    "reward_model_accuracy": ("Reward model pair accuracy", "fraction of pairs ranked right",
                              [("accuracy", "train", " training batches"), ("eval_accuracy", "train", " held-out")]),
}
# Figures drawn from only some stages (the others have no such metric, or one with another meaning).
ONLY_STAGES = {"sft_loss": {"sft"}, "reward_model_accuracy": {"reward_model"}}
NOT_STAGES = {"accuracy": {"reward_model"}, "reward": {"sft", "reward_model"}, "clip_fraction": {"sft"},
              "response_length": {"sft"}, "entropy": {"sft"}, "mismatch": {"sft"}, "masked_fraction": {"sft"}}


def series(records: Sequence[dict], stage: str, metric: str, kind: str,
           offset: int = 0) -> tuple[list[int], list[float]]:
    """(steps + offset, values) of one metric of one stage and record kind, in step order."""
    points = [(r["step"] + offset, r[metric]) for r in records
              if r["stage"] == stage and r.get("kind", "train") == kind and r.get(metric) is not None]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def stage_offsets(records: Sequence[dict]) -> dict[str, int]:
    """Where each stage starts on the run-wide step axis: the sum of the earlier stages' last steps."""
    offsets, total = {}, 0
    for stage in dict.fromkeys(r["stage"] for r in records):
        offsets[stage] = total
        total += max(r["step"] for r in records if r["stage"] == stage)
    return offsets


def plot_records(records: Sequence[dict], out_dir: str | Path, name_prefix: str = "") -> list[Path]:
    """Write the figures of :data:`FIGURES` that have data into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = stage_offsets(records)
    written = []
    for name, (title, ylabel, lines) in FIGURES.items():
        stages = [s for s in offsets if s in ONLY_STAGES.get(name, {s}) and s not in NOT_STAGES.get(name, set())]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = 0
        for stage in stages:
            for metric, kind, suffix in lines:
                xs, ys = series(records, stage, metric, kind, offsets[stage])
                if xs:
                    ax.plot(xs, ys, marker="o" if kind == "eval" or len(xs) < 30 else None, markersize=3,
                            label=f"{stage}{suffix}")
                    drawn += 1
        if drawn:
            ax.set(title=title, xlabel="step (stages in run order)", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{name_prefix}{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def plot_run(run_dir: str | Path) -> list[Path]:
    """Plots of ``run_dir/metrics.jsonl`` into ``run_dir/plots``."""
    return plot_records(read_metrics(run_dir), Path(run_dir) / "plots")


__all__ = ["FIGURES", "series", "stage_offsets", "plot_records", "plot_run"]
