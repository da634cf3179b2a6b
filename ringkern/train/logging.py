"""Run logging: one JSONL line per logged step, the same scalars in TensorBoard, and a progress bar.

``RUN_DIR/metrics.jsonl`` holds records ``{"stage": "rlvr", "step": 3, "time": ..., "reward": ..., ...}``
(evaluations are records with ``"kind": "eval"``); :mod:`ringkern.train.plot` reads it back.
TensorBoard scalars go to ``RUN_DIR/tensorboard`` as ``stage/name``. The tqdm bar shows the step, the
reward (or loss) and the time left. Under torchrun only rank 0 logs; elsewhere a RunLogger does nothing.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..distributed.mesh import is_main_process

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Logs the steps of one stage; use as a context manager (closes the bar and the writer)."""

    def __init__(self, run_dir: str | Path, stage: str, total_steps: int, *, start_step: int = 0,
                 progress: bool = True):
        self.enabled = is_main_process()
        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, disable=not progress,
                        dynamic_ncols=True, leave=False)

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """Append a record and write the scalars; non-finite values are written as null in JSON."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"stage": self.stage, "kind": kind, "step": step, "time": time.time()}
        record.update({k: _finite_or_none(v) for k, v in metrics.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        prefix = self.stage if kind == "train" else f"{self.stage}_{kind}"
        for name, value in metrics.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def advance(self, metrics: dict[str, float]) -> None:
        """Move the bar one step, showing reward/accuracy or loss."""
        if not self.enabled:
            return
        shown = {k: f"{metrics[k]:.3f}" for k in ("reward", "accuracy", "loss") if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        self.bar.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        self.jsonl.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; after a resume the last record of each (stage, kind, step) wins."""
    path = Path(run_dir) / METRICS_FILE
    latest: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                latest[(rec["stage"], rec.get("kind", "train"), rec["step"])] = rec
    return list(latest.values())


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


__all__ = ["RunLogger", "read_metrics", "METRICS_FILE"]
