"""Expert parallelism: each rank holds E/W of every MoE layer's routed experts; tokens travel to them.

:class:`ExpertParallelExperts` replaces a layer's :class:`ringkern.model.RoutedExperts` (same call, same
parameter names, so ``MoEBlock`` and checkpoints see no difference). Its ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I] are DTensors sharded on dim 0 over the mesh: rank r holds experts
[r E/W, (r+1) E/W). Two ways to run a layer, chosen by the call the model already makes:

- Sharded tokens (training, and every forward without a KV cache): each rank routes its own tokens.
  The token slots are sorted by expert (hence by owning rank); the per-expert counts go first through
  one ``all_to_all_single``, which tells every rank how many rows it receives for each of its experts;
  the rows then go with ``all_to_all_single_autograd`` (gradients flow back through the reverse
  all-to-all), the owner runs ``ops.moe_experts`` over its local experts (rows carry local expert ids and
  weight 1), the outputs come back by the reverse all-to-all, and the source rank combines them with its
  routing weights in fp32, summing each token's slots in the fixed order of the single-process reference
  (deterministic). Each expert's
  gradient sums the contributions of every rank's tokens; it is scaled by 1/W so that it matches the
  gradient FSDP gives the dense parameters (the average of the ranks' losses).
- Replicated tokens (``sync_free=True``: the Engine's cached prefill and decode, where every rank runs the
  same sequences): each rank runs its own experts on all tokens, with the routing weight of every
  (token, expert) pair it does not own set to 0 and that pair pointed at its first local expert, and one
  fp32 ``all_reduce`` sums the partial outputs. No host sync and fixed shapes, so a CUDA graph can
  capture the step; the price is the zero-weight rows its first expert computes.

:class:`GlobalCountRouter` (swapped in by :func:`apply_expert_parallel`) sums the router's
``tokens_per_expert`` over the ranks in training forwards (grad enabled), so the aux-loss-free
expert-bias update sees the global load and the bias buffers stay identical on every rank.

Shape legend: T tokens on this rank, H hidden, k experts per token, S = T k slots, E experts,
W ranks, El = E / W local experts, R rows received by this rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .. import ops
from ..model import RingFlashModel, RoutedExperts, Router
from ..ops import inference as inference_ops
from ..ops.reference import _acc, combine_slots


@dataclass
class DispatchPlan:
    """Where this rank's token slots go and what it receives, for one MoE layer call."""

    order: torch.Tensor  # [S] int64: slots sorted by expert (stable), i.e. the send order
    send_splits: list[int]  # [W] rows sent to each rank
    recv_splits: list[int]  # [W] rows received from each rank
    recv_expert_ids: torch.Tensor  # [R] int32 local expert id of each received row
    tokens_per_local_expert: torch.Tensor  # [El] int64 rows received for each local expert (all sources)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (used on the expert weights only)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def dispatch_plan(expert_ids: torch.Tensor, num_experts: int, group: dist.ProcessGroup) -> DispatchPlan:
    """Sort this rank's slots by expert and exchange per-expert counts with one all-to-all.

    expert_ids: [T, k] global expert ids. Every rank of ``group`` must call this together. One host
    sync (the split sizes an all-to-all needs as Python ints).
    """
    W = dist.get_world_size(group)
    if num_experts % W:
        raise ValueError(f"num_experts={num_experts}: expected a multiple of the expert-parallel size {W}")
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert_ids: values must lie in [0, {num_experts})")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)  # [E] slots of this rank per expert
    recv_counts = torch.empty_like(counts)  # [W El]: rows of source w for local expert j at w El + j
    dist.all_to_all_single(recv_counts, counts, group=group)
    local = num_experts // W
    recv_counts = recv_counts.view(W, local)
    local_ids = torch.arange(local, dtype=torch.int32, device=flat.device).repeat(W)
    return DispatchPlan(order=order, send_splits=counts.view(W, local).sum(1).tolist(),
                        recv_splits=recv_counts.sum(1).tolist(),
                        recv_expert_ids=local_ids.repeat_interleave(recv_counts.reshape(-1)),
                        tokens_per_local_expert=recv_counts.sum(0))


def expert_parallel_moe(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                        gate_up_local: torch.Tensor, down_local: torch.Tensor, num_experts: int,
                        group: dist.ProcessGroup) -> torch.Tensor:
    """Routed experts over sharded tokens: dispatch, local experts, combine (see the module docstring).

    x [T, H], weights [T, k] fp32, expert_ids [T, k] global ids, gate_up_local [El, 2I, H],
    down_local [El, H, I] (this rank's experts) -> [T, H] in x's dtype; differentiable in x, weights and
    the local expert weights. Equals ``ops.moe_experts`` with all E experts on the union of the ranks' tokens.
    """
    T = x.shape[0]
    k = expert_ids.shape[1]
    plan = dispatch_plan(expert_ids, num_experts, group)
    token_of_slot = plan.order // k  # [S]
    rows = funcol.all_to_all_single_autograd(x[token_of_slot], plan.recv_splits, plan.send_splits, group)
    rows = funcol.wait_tensor(rows)  # [R, H]
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    out = ops.moe_experts(rows, ones, plan.recv_expert_ids.unsqueeze(1), gate_up_local, down_local)  # [R, H]
    back = funcol.wait_tensor(funcol.all_to_all_single_autograd(out, plan.send_splits, plan.recv_splits, group))
    weighted = _acc(back) * _acc(weights.reshape(-1)[plan.order]).unsqueeze(-1)  # [S, H] fp32
    return combine_slots(weighted, plan.order, T, k).to(x.dtype)


def replicated_moe(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                   gate_up_local: torch.Tensor, down_local: torch.Tensor, first_expert: int,
                   group: dist.ProcessGroup) -> torch.Tensor:
    """Routed experts over tokens every rank holds alike: local partial sums, one fp32 all-reduce.

    Same shapes as :func:`expert_parallel_moe`; ``first_expert`` is this rank's first global expert id.
    Inference only (no gradient through the all-reduce); no host sync.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad or gate_up_local.requires_grad):
        raise RuntimeError("replicated_moe is for inference (the sync_free path): call it under torch.no_grad()")
    local = gate_up_local.shape[0]
    ids = expert_ids.long() - first_expert
    owned = (ids >= 0) & (ids < local)
    partial = inference_ops.moe_experts(x, torch.where(owned, weights, torch.zeros_like(weights)),
                                        torch.where(owned, ids, torch.zeros_like(ids)).to(expert_ids.dtype),
                                        gate_up_local, down_local)
    total = partial.float()
    dist.all_reduce(total, group=group)
    return total.to(x.dtype)


class ExpertParallelExperts(nn.Module):
    """Drop-in for :class:`ringkern.model.RoutedExperts` with the experts sharded over a 1-D mesh."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, mesh: DeviceMesh):
        """gate_up_proj [E, 2I, H] and down_proj [E, H, I]: the full stacked weights (identical on every
        rank, e.g. seeded or loaded alike); this rank keeps its E/W slice of each."""
        super().__init__()
        if mesh.ndim != 1:
            raise ValueError(f"mesh: expected a 1-D DeviceMesh, got {mesh.ndim} dimensions")
        E, W = gate_up_proj.shape[0], mesh.size()
        if E % W:
            raise ValueError(f"gate_up_proj: {E} experts do not split evenly over {W} ranks")
        if down_proj.shape[0] != E:
            raise ValueError(f"down_proj: {down_proj.shape[0]} experts, expected {E} like gate_up_proj")
        self.mesh, self.num_experts = mesh, E
        self.local_experts = E // W
        self.first_expert = mesh.get_local_rank() * self.local_experts
        self.gate_up_proj = nn.Parameter(self._shard(gate_up_proj))
        self.down_proj = nn.Parameter(self._shard(down_proj))

    @classmethod
    def from_experts(cls, experts: RoutedExperts, mesh: DeviceMesh) -> "ExpertParallelExperts":
        return cls(experts.gate_up_proj.detach(), experts.down_proj.detach(), mesh)

    def _shard(self, full: torch.Tensor) -> DTensor:
        local = full[self.first_expert:self.first_expert + self.local_experts].clone()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                sync_free: bool = False, shared: nn.Module | None = None) -> torch.Tensor:
        """As RoutedExperts.forward; ``shared`` (the layer's shared expert, replicated) is added after."""
        group = self.mesh.get_group()
        gate_up, down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        if sync_free:
            y = replicated_moe(x, weights, expert_ids, gate_up, down, self.first_expert, group)
        else:
            scale = 1.0 / self.mesh.size()
            y = expert_parallel_moe(x, weights, expert_ids, _ScaleGrad.apply(gate_up, scale),
                                    _ScaleGrad.apply(down, scale), self.num_experts, group)
        return y if shared is None else y + shared(x)

    def extra_repr(self) -> str:
        return f"experts {self.first_expert}..{self.first_expert + self.local_experts - 1} of {self.num_experts}"


class GlobalCountRouter(Router):
    """Router whose ``tokens_per_expert`` is summed over ``count_group`` in training forwards (grad
    enabled); with grad off (inference, where ranks may hold the same tokens) it stays this rank's."""

    count_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None):
        weights, ids, counts = super().forward(x, expert_ids, token_mask)
        if torch.is_grad_enabled():
            counts = funcol.wait_tensor(funcol.all_reduce(counts, "sum", self.count_group))
        return weights, ids, counts


def moe_blocks(model: RingFlashModel) -> list[nn.Module]:
    """The MoE blocks (``layer.mlp``) of every decoder and MTP layer."""
    return [layer.mlp for layer in model.model.layers if layer.is_moe]


def apply_expert_parallel(model: RingFlashModel, mesh: DeviceMesh, *, global_counts: bool = True) -> RingFlashModel:
    """Swap every MoE layer's experts for :class:`ExpertParallelExperts` over ``mesh`` (in place).

    global_counts: also turn the routers into :class:`GlobalCountRouter` (training: the bias update
    needs the load over all ranks). The model's weights must be identical on every rank.
    """
    for block in moe_blocks(model):
        if isinstance(block.experts, ExpertParallelExperts):
            raise ValueError("apply_expert_parallel: the model's experts are already expert-parallel")
        block.experts = ExpertParallelExperts.from_experts(block.experts, mesh)
        if global_counts:
            block.gate.__class__ = GlobalCountRouter
            block.gate.count_group = mesh.get_group()
    return model


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of every :class:`ExpertParallelExperts` in ``model`` (sharded by EP, not by FSDP)."""
    return {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


__all__ = ["DispatchPlan", "dispatch_plan", "expert_parallel_moe", "replicated_moe", "ExpertParallelExperts",
           "GlobalCountRouter", "moe_blocks", "apply_expert_parallel", "expert_parameters"]
