"""Training state: atomic checkpoints that resume exactly, and the guard against non-finite steps.

A training-state checkpoint (``<stage dir>/state/step-000040.pt``, the newest one wins) holds everything
the next step depends on: model weights with the expert biases (buffers of the state dict), the
optimizer and LR-scheduler states, the python / numpy / torch / CUDA RNG states, the data position and
the step. It is written to a temporary file, fsynced and renamed into place, so a crash leaves either
the previous checkpoint or the new one. Restoring it and running the next step on the CPU gives the
same loss, bit for bit, as never having stopped.

:func:`optimizer_step` is the one place a training step touches the optimizer: it clips the gradient
and skips the update when the loss or the gradient norm is NaN/Inf, counting such steps in a
:class:`NonFiniteGuard` that aborts the run after ``max_bad_steps`` in a row.
"""
from __future__ import annotations

import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import trainer as dist_trainer

STATE_DIR = "state"
_STATE_RE = re.compile(r"^step-(\d+)\.(pt|dcp)$")  # .dcp: a sharded (torchrun) state, a DCP directory


class NonFiniteError(RuntimeError):
    """Too many NaN/Inf steps in a row: the run is diverging."""


@dataclass
class NonFiniteGuard:
    """Counts non-finite steps in a row; ``record(False)`` past ``max_bad_steps`` raises NonFiniteError."""

    max_bad_steps: int = 3
    in_a_row: int = 0
    total_skipped: int = 0

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total_skipped += 1
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteError(f"step {step}: {self.in_a_row} non-finite (NaN/Inf) steps in a row "
                                 f"(run.max_bad_steps={self.max_bad_steps}); aborting")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss: torch.Tensor,
                   guard: NonFiniteGuard, step: int, grad_clip: float) -> dict[str, float]:
    """Clip, check and apply the gradients already accumulated in ``model`` for ``loss``.

    A NaN/Inf loss or gradient norm skips the update (the gradients are dropped, the scheduler does
    not advance) and is recorded in ``guard``. Returns {"grad_norm", "skipped"} (skipped 1.0 or 0.0).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    finite = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad_norm))
    guard.record(finite, step)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(grad_norm), "skipped": 0.0 if finite else 1.0}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingState:
    """What a stage needs to continue: the step just finished and the data position after it."""

    step: int = 0
    data_position: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific counters (e.g. the NaN guard)


def save_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               state: TrainingState, keep: int = 2) -> Path:
    """Write ``directory/state/step-N.pt`` atomically; older ones beyond the newest ``keep`` are removed.
    A parallelized model (torchrun) writes ``step-N.dcp``, sharded (:mod:`ringkern.distributed.trainer`)."""
    folder = Path(directory) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"scheduler": scheduler.state_dict(), "rng": rng_state(),
               "step": state.step, "data_position": state.data_position, "extra": state.extra}
    if dist_trainer.is_parallelized(model):
        target = dist_trainer.save_training_state(folder, f"step-{state.step:06d}.dcp", model, optimizer, payload)
        for old in _state_files(folder)[:-keep]:
            dist_trainer.remove_state(old)
        return target
    payload.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    target = folder / f"step-{state.step:06d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in _state_files(folder)[:-keep]:
        old.unlink()
    return target


def latest_state(directory: str | Path) -> Path | None:
    files = _state_files(Path(directory) / STATE_DIR)
    return files[-1] if files else None


def load_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> TrainingState:
    """Restore model, optimizer, scheduler and RNG states from ``path``; returns the step and data position."""
    if Path(path).suffix == dist_trainer.DCP_SUFFIX:
        payload = dist_trainer.load_training_state(Path(path), model, optimizer)
    else:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return TrainingState(payload["step"], payload["data_position"], payload["extra"])


def _state_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_RE.match(p.name))]
    return [p for _, p in sorted(found)]


__all__ = ["NonFiniteError", "NonFiniteGuard", "optimizer_step", "rng_state", "set_rng_state", "seed_everything",
           "TrainingState", "save_state", "latest_state", "load_state"]
