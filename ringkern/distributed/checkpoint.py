"""Distributed checkpoints (torch.distributed.checkpoint) and conversion to and from the published format.

A sharded checkpoint is a DCP directory: every rank writes its own shards (FSDP shards of the dense
weights, its experts' slices, its optimizer state) in parallel and a ``.metadata`` file records the
global layout, so it loads onto any number of ranks, or into one process, with resharding done by DCP.
The state saved is ``{"model": ..., "optimizer": ..., "extra": ...}`` with the model's own FQNs (the
names of ``RingFlashModel.state_dict()``: stacked experts), plus ``config.json`` written by rank 0.

- :func:`save_sharded` / :func:`load_sharded`: model (+ optimizer, + a dict of extra values) on all ranks.
- :func:`save_pretrained_sharded`: gather the full state to rank 0 and write the published format there.
- :func:`load_pretrained_sharded`: the published format straight into a parallelized model, each rank
  reading only its shards (no rank ever holds the whole model).
- :func:`dcp_to_pretrained` / :func:`pretrained_to_dcp`: offline conversion in one process, no process
  group needed: DCP directory -> published safetensors, and back.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..checkpoint import (CONFIG_FILE, Destination, fill_from_checkpoint, load_pretrained, open_checkpoint,
                          resolve_dtype, save_pretrained)
from ..config import RingConfig
from ..model import RingFlashModel
from .mesh import is_main_process
from .parallelize import parallelize


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if isinstance(model, FSDPModule):
        # The root stays unsharded after a forward; the optimizer holds the sharded parameters.
        model.reshard()
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(path: str | os.PathLike, model: RingFlashModel, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a DCP checkpoint of ``model`` (and ``optimizer``, and ``extra``: a dict of picklable values,
    stored once, as rank 0 holds it) to directory ``path``; every rank calls it. Returns ``path``."""
    path = Path(path)
    state = _state(model, optimizer)
    if extra is not None:
        buffer = io.BytesIO()
        torch.save(extra, buffer)
        state["extra"] = buffer
    dcp.save(state, checkpoint_id=str(path))
    if is_main_process():
        (path / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return path


def load_sharded(path: str | os.PathLike, model: RingFlashModel, optimizer: torch.optim.Optimizer | None = None,
                 *, with_extra: bool = False) -> dict[str, Any] | None:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``) in place, resharding to
    this run's ranks; every rank calls it. with_extra: also read and return the saved ``extra`` dict."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"path={str(path)!r}: not a DCP checkpoint (no .metadata file)")
    state = _state(model, optimizer)
    if with_extra:
        state["extra"] = io.BytesIO()
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    if not with_extra:
        return None
    state["extra"].seek(0)
    return torch.load(state["extra"], weights_only=False)


class _FullState:
    """What :func:`ringkern.checkpoint.save_pretrained` reads from a model: its config and a state dict."""

    def __init__(self, config: RingConfig, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a parallelized ``model`` on every rank (device tensors); every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def gather_full_copy(model: RingFlashModel) -> RingFlashModel:
    """An unsharded copy of a parallelized ``model`` on every rank (same device and dtype); every rank calls
    it. For a model that each rank must hold whole, e.g. a reward model that starts from the policy."""
    state = gather_full_state(model)
    reference = next(iter(state.values()))
    copy = RingFlashModel(model.config).to(device=reference.device, dtype=reference.dtype)
    copy.load_state_dict(state)
    return copy


def save_pretrained_sharded(model: RingFlashModel, path: str | os.PathLike, **kwargs) -> Path:
    """Write a parallelized ``model`` in the published format: the full state is gathered to rank 0's
    CPU memory and written there (kwargs as for ``save_pretrained``); every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if is_main_process():
        save_pretrained(_FullState(model.config, state), path, **kwargs)
    if dist.is_initialized():
        dist.barrier()
    return Path(path)


def load_pretrained_sharded(path: str | os.PathLike, mesh: DeviceMesh, *, dtype: torch.dtype | str | None = None,
                            device: torch.device | str | None = None) -> RingFlashModel:
    """A published checkpoint loaded straight into :func:`parallelize` (EP + FSDP2 over ``mesh``): the model
    is built on the meta device and sharded first, then each rank reads from the safetensors files only
    the rows of its FSDP shards and the tensors of its own experts. The same weights as
    ``parallelize(load_pretrained(path), mesh)``; every rank calls it."""
    path = Path(path)
    config, tensors = open_checkpoint(path)
    with torch.device("meta"):
        model = RingFlashModel(config)
    model.to(dtype=resolve_dtype(dtype, config))
    parallelize(model, mesh)
    model.to_empty(device=torch.device("cpu") if device is None else device)
    local = {key: _local_rows(t) for key, t in model.state_dict().items()}

    def target(name: str, dest: Destination) -> tuple[torch.Tensor, tuple] | None:
        shard, start, rows = local[dest.key]
        if dest.index is None:  # a whole tensor: this rank's rows of it
            return (shard, (slice(start, start + rows),)) if rows else None
        expert = dest.index[0]  # one expert's matrix of a stacked parameter
        if not start <= expert < start + rows:
            return None
        return shard[(expert - start, *dest.index[1:])], ()

    fill_from_checkpoint(path, tensors, config, model, target)
    return model


def _local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's tensor, its first row in the whole tensor, its rows) for a state entry: a DTensor
    sharded on dim 0 over a 1-D mesh (FSDP2 and expert parallelism: torch.chunk's split) or a whole one."""
    if not isinstance(t, DTensor):
        return t, 0, t.shape[0]
    if t.device_mesh.ndim != 1 or t.placements != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on dim 0 over a 1-D mesh, got placements {t.placements}")
    shard = t.to_local()
    chunk = -(-t.shape[0] // t.device_mesh.size())
    return shard, min(chunk * t.device_mesh.get_local_rank(), t.shape[0]), shard.shape[0]


def _read_config(dcp_dir: Path) -> RingConfig:
    config_file = dcp_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"dcp_dir={str(dcp_dir)!r}: no {CONFIG_FILE} (written by save_sharded)")
    return RingConfig.from_json(config_file)


def dcp_to_pretrained(dcp_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      dtype: torch.dtype | None = None, tokenizer: Any = None) -> Path:
    """Convert a DCP checkpoint (model part) to the published format, in one process on the CPU."""
    dcp_dir = Path(dcp_dir)
    config = _read_config(dcp_dir)
    with torch.device("meta"):
        model = RingFlashModel(config)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    return save_pretrained(model, out_dir, dtype=dtype, tokenizer=tokenizer)


def pretrained_to_dcp(src_dir: str | os.PathLike, dcp_dir: str | os.PathLike, *,
                      dtype: torch.dtype | None = None) -> Path:
    """Convert a published checkpoint to a DCP checkpoint (model only) that :func:`load_sharded` reads
    onto any number of ranks; one process, on the CPU."""
    dcp_dir = Path(dcp_dir)
    model = load_pretrained(src_dir, dtype=dtype, device="cpu")
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(dcp_dir), no_dist=True)
    (dcp_dir / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    return dcp_dir


__all__ = ["save_sharded", "load_sharded", "gather_full_copy", "gather_full_state", "load_pretrained_sharded",
           "save_pretrained_sharded", "dcp_to_pretrained", "pretrained_to_dcp"]
