"""The pieces of ``ringkern train`` that change under torchrun; each is a no-op for a single process.

- :func:`setup`: process group and mesh from the torchrun environment (gloo on the CPU, NCCL on CUDA).
- :func:`prepare_model`: :func:`~ringkern.distributed.parallelize.parallelize` (EP + FSDP2) when distributed;
  :func:`load_model`: a checkpoint loaded the same way, each rank reading only its shards.
- :func:`save_training_state` / :func:`load_training_state`: a DCP directory per training state
  (``step-000040.dcp``: sharded model and optimizer, plus rank 0's scheduler/RNG/position payload),
  written under a temporary name and renamed into place by rank 0 once every rank has finished.
- :func:`save_model`: the published format, gathered to rank 0 and written there.

Data: SFT examples are sharded by rank (:func:`ringkern.distributed.mesh.shard_for_rank`), so a step
trains on world_size x batch_size examples. GRPO by default runs the same prompts, rollouts and updates
on every rank (the Engine's replicated-token expert parallelism needs the lockstep), so the ranks split
the experts' memory and work only. With ``rollout_parallelism: data`` it is data parallel: each rank
decodes its share of the prompts on a whole copy of the policy (gathered before each rollout; the model
must fit a device), the rollouts are all-gathered, and every minibatch's old log-probs and update are
split over the ranks (each rank's loss scaled to its part of the minibatch's denominators). RLHF's
reward model is gathered whole on every rank and trained data parallel
(:func:`ringkern.reward_model.train_reward_model`). Only rank 0 writes logs, metrics and plots.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..model import RingFlashModel
from .checkpoint import load_pretrained_sharded, load_sharded, save_pretrained_sharded, save_sharded
from .mesh import current_mesh, init_mesh, is_distributed, is_main_process, local_device
from .parallelize import is_parallelized, parallelize

DCP_SUFFIX = ".dcp"


def setup() -> DeviceMesh | None:
    """Start the process group and mesh when launched by torchrun; None for a single process."""
    return init_mesh()


def resolve_device(name: str) -> torch.device | None:
    """This rank's device for run.device="auto" when distributed (``cuda:LOCAL_RANK`` or the CPU), else None."""
    return local_device() if name == "auto" and is_distributed() else None


def prepare_model(model: nn.Module) -> nn.Module:
    """Expert parallelism + FSDP2 over the current mesh; the model itself for a single process."""
    return parallelize(model, current_mesh())


def load_model(path: Path, device: torch.device) -> nn.Module:
    """A published checkpoint as an fp32 training model: parallelized while loading under torchrun (each
    rank reads only its shards), else whole."""
    mesh = current_mesh()
    if mesh is None:
        return RingFlashModel.from_pretrained(path, dtype=torch.float32, device=device)
    return load_pretrained_sharded(path, mesh, dtype=torch.float32, device=device)


def save_training_state(folder: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        payload: dict[str, Any]) -> Path:
    """Write ``folder/name`` (a DCP directory) from every rank; rank 0 renames it into place last."""
    target, tmp = folder / name, folder / f".tmp-{name}"
    if is_main_process() and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    save_sharded(tmp, model, optimizer, extra=payload)
    if is_main_process():
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    dist.barrier()
    return target


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a :func:`save_training_state` directory into ``model`` and ``optimizer``; returns the payload."""
    return load_sharded(path, model, optimizer, with_extra=True)


def remove_state(path: Path) -> None:
    """Delete an old training state (rank 0 only; directories for DCP states)."""
    if is_main_process():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_model(model: nn.Module, directory: Path, tokenizer: Any) -> Path:
    """Published-format checkpoint of a parallelized model, written by rank 0; every rank calls it."""
    return save_pretrained_sharded(model, directory, tokenizer=tokenizer)


__all__ = ["DCP_SUFFIX", "setup", "resolve_device", "prepare_model", "load_model", "is_parallelized",
           "save_training_state", "load_training_state", "remove_state", "save_model"]
