"""Process group and DeviceMesh from the torchrun environment; a single process needs neither.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_mesh` starts the default process
group (gloo on the CPU, NCCL on CUDA, pinned to ``cuda:LOCAL_RANK``) and returns a 1-D DeviceMesh over all
ranks, named ``("world",)``: FSDP2 shards the dense parameters and expert parallelism splits the routed
experts over that one dimension. Launched as a plain process it returns None, and every helper of
:mod:`ringkern.distributed` given a None mesh leaves the model as it is, so one code path serves both.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIM = "world"
_T = TypeVar("_T")
_mesh: DeviceMesh | None = None


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes logs, plots and published checkpoints."""
    return rank() == 0


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device(device_type: str | None = None) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on a GPU host, else the CPU."""
    device_type = device_type or default_device_type()
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device_type)


def init_mesh(device_type: str | None = None) -> DeviceMesh | None:
    """The 1-D mesh over all ranks, made once per process (later calls return the same mesh).

    Starts the default process group from the torchrun environment if none exists yet; a process group
    started by the caller (e.g. ``dist.init_process_group("gloo", ...)`` in a test) is used as is.
    Returns None for a single process.
    """
    global _mesh
    if _mesh is not None:
        return _mesh
    if not (dist.is_available() and (dist.is_initialized() or launched_by_torchrun())):
        return None
    device_type = device_type or default_device_type()
    if device_type == "cuda":
        torch.cuda.set_device(local_device("cuda"))
    size = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    if size == 1:
        return None
    _mesh = init_device_mesh(device_type, (size,), mesh_dim_names=(MESH_DIM,))
    return _mesh


def current_mesh() -> DeviceMesh | None:
    """The mesh :func:`init_mesh` made, or None."""
    return _mesh


def shutdown() -> None:
    """Destroy the default process group (end of a torchrun job) and forget the mesh."""
    global _mesh
    _mesh = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_for_rank(items: Sequence[_T]) -> list[_T]:
    """This rank's equal share of ``items``: every world_size-th item from index rank, cut to the same
    length on every rank (ranks must run the same number of steps: the collectives pair them up)."""
    n = len(items) // world_size()
    if n == 0:
        raise ValueError(f"shard_for_rank: {len(items)} items cannot give each of {world_size()} ranks one")
    return list(items[rank()::world_size()][:n])


__all__ = ["MESH_DIM", "launched_by_torchrun", "is_distributed", "rank", "world_size", "is_main_process",
           "default_device_type", "local_device", "init_mesh", "current_mesh", "shutdown", "shard_for_rank"]
