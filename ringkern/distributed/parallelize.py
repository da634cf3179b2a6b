"""Shard a RingFlashModel over a mesh: expert parallelism for the MoE layers, FSDP2 for the rest.

:func:`parallelize` (training) swaps in :class:`~ringkern.distributed.expert_parallel.ExpertParallelExperts`
and applies ``fully_shard`` to every decoder/MTP layer and then to the root (embeddings, final norm,
lm_head), leaving the expert weights to expert parallelism (``ignored_params``). ``sft_loss`` is
registered as an FSDP forward method, since it calls ``forward`` and then reads ``lm_head.weight``.
:func:`parallelize_for_inference` only swaps the experts: the dense weights stay whole on every rank
(they are a few percent of Ring-flash-2.0), which is what the Engine's replicated decode wants.

With ``mesh=None`` (a single process) both return the model unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..model import RingFlashModel
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel, expert_parameters

FORWARD_METHODS = ("sft_loss",)


def parallelize(model: RingFlashModel, mesh: DeviceMesh | None, *, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> RingFlashModel:
    """Expert parallelism + FSDP2 over the 1-D ``mesh``, in place; returns the model.

    The model must hold the same weights on every rank (seeded alike or loaded from one checkpoint) on
    this rank's device. param_dtype: FSDP all-gathers and computes the dense weights in this dtype
    (gradients are reduced in fp32); None keeps the parameters' dtype.
    """
    if mesh is None:
        return model
    if is_parallelized(model):
        raise ValueError("parallelize: the model is already parallelized")
    apply_expert_parallel(model, mesh)
    ignored = expert_parameters(model)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                    ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def parallelize_for_inference(model: RingFlashModel, mesh: DeviceMesh | None) -> RingFlashModel:
    """Expert parallelism only (dense weights replicated), in place; for the Engine. Returns the model."""
    if mesh is None:
        return model
    return apply_expert_parallel(model, mesh, global_counts=False)


def is_parallelized(model: nn.Module) -> bool:
    """True when ``model`` went through :func:`parallelize` or :func:`parallelize_for_inference`."""
    return isinstance(model, FSDPModule) or any(isinstance(m, ExpertParallelExperts) for m in model.modules())


__all__ = ["parallelize", "parallelize_for_inference", "is_parallelized", "FORWARD_METHODS"]
