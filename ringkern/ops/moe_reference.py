"""Pure-PyTorch references of the MoE kernel ops (``torch.ops.ringkern.moe_*``): their CPU kernels and the
oracles of the CUDA kernels.

They build on :func:`ringkern.ops.reference.moe_route` and :func:`~ringkern.ops.reference.moe_experts`
(the contract) and add what the kernel ops expose besides: the dispatch (a stable sort of token slots by
expert), the tensors the experts' forward keeps for its backward, and the explicit backward formulas.

Shape legend: T tokens, H hidden, E experts, k experts per token, I expert intermediate size,
S = T*k token slots (slot = t*k + j), sorted by expert ("sorted order").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _acc, join_gate_up, split_gate_up


def moe_route_backward(grad_weights: torch.Tensor, router_logits: torch.Tensor, expert_ids: torch.Tensor,
                       routed_scaling_factor: float, renormalize: bool) -> torch.Tensor:
    """Gradient of moe_route's weights w.r.t. router_logits ([T, E] fp32).

    w_j = c s_j / (S + eps) (S = sum_j s_j) when renormalizing, else c s_j; s = sigmoid(logits).
    """
    ids = expert_ids.long()
    s = torch.sigmoid(router_logits.float()).gather(1, ids)  # [T, k]
    g = grad_weights.float()
    if renormalize:
        denom = s.sum(-1, keepdim=True) + 1e-20
        ds = routed_scaling_factor * (g / denom - (g * s).sum(-1, keepdim=True) / denom**2)
    else:
        ds = routed_scaling_factor * g
    grad = torch.zeros_like(router_logits, dtype=torch.float32)
    return grad.scatter_add_(1, ids, ds * s * (1 - s))


def moe_dispatch(expert_ids: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens_per_expert [E], offsets [E] cumulative ends, sorted_slot [S], slot_pos [S]), all int32.

    sorted_slot lists the slots expert by expert, each expert's slots in increasing slot order (stable);
    slot_pos is its inverse: the sorted position of each slot.
    """
    flat = expert_ids.reshape(-1).long()
    sorted_slot = torch.argsort(flat, stable=True)
    slot_pos = torch.empty_like(sorted_slot)
    slot_pos[sorted_slot] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    i32 = torch.int32
    return counts.to(i32), counts.cumsum(0).to(i32), sorted_slot.to(i32), slot_pos.to(i32)


def _expert_slices(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert with tokens, from the cumulative ends."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def moe_experts_forward(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                        gate_up_proj: torch.Tensor, down_proj: torch.Tensor, atomic_combine: bool = False
                        ) -> tuple[torch.Tensor, ...]:
    """(y [T, H], gate_up_out [S, 2I], sorted_slot, slot_pos, offsets); y as reference.moe_experts computes it.
    atomic_combine (a CUDA kernel option) changes nothing here."""
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    k = expert_ids.shape[1]
    _, offsets, sorted_slot, slot_pos = moe_dispatch(expert_ids, E)
    token = sorted_slot.long() // k
    x_sorted = x[token]  # [S, H]
    gate_up_out = x.new_empty(T * k, two_i)
    y_sorted = x.new_empty(T * k, H)
    for e, s, t in _expert_slices(offsets):
        gate_up_out[s:t] = x_sorted[s:t] @ gate_up_proj[e].t()
        gate, up = split_gate_up(gate_up_out[s:t])
        y_sorted[s:t] = (F.silu(gate) * up) @ down_proj[e].t()
    w_sorted = _acc(weights.reshape(-1)[sorted_slot.long()]).unsqueeze(-1)
    y = torch.zeros(T, H, dtype=w_sorted.dtype, device=x.device)
    y.index_add_(0, token, _acc(y_sorted) * w_sorted)
    return y.to(x.dtype), gate_up_out, sorted_slot, slot_pos, offsets


def moe_experts_backward(grad_y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                         down_proj: torch.Tensor, gate_up_out: torch.Tensor, sorted_slot: torch.Tensor,
                         slot_pos: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(grad_x, grad_weights fp32, grad_gate_up_proj, grad_down_proj), in fp32 (fp64 for fp64 inputs).

    With g, u = gate_up_out (per slot), a = silu(g) u, w the slot's routing weight, dy the token's gradient:
    G = dy W_down[e]; grad_w = <G, a>; dA = w G; d_gate = dA u silu'(g); d_up = dA silu(g);
    grad W_down[e] = sum dy^T (w a); grad W_gu[e] = sum d_gu^T x; grad x = sum d_gu W_gu[e], with d_gu the
    interleaved d_gate, d_up.
    """
    T, H = x.shape
    k = weights.shape[1]
    token = sorted_slot.long() // k
    acc = torch.promote_types(x.dtype, torch.float32)
    dy_sorted = grad_y[token].to(acc)
    x_sorted = x[token].to(acc)
    w_sorted = weights.reshape(-1)[sorted_slot.long()].to(acc).unsqueeze(-1)
    gate, up = split_gate_up(gate_up_out.to(acc))
    sig = torch.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    grad_gate_up = torch.zeros_like(gate_up_proj, dtype=acc)
    grad_down = torch.zeros_like(down_proj, dtype=acc)
    dx_sorted = torch.zeros_like(x_sorted)
    dw_sorted = torch.zeros(sorted_slot.numel(), dtype=acc, device=x.device)
    for e, s, t in _expert_slices(offsets):
        G = dy_sorted[s:t] @ down_proj[e].to(acc)  # [n, I]
        dw_sorted[s:t] = (G * act[s:t]).sum(-1)
        dA = w_sorted[s:t] * G
        d_gate_up = join_gate_up(dA * up[s:t] * sig[s:t] * (1 + gate[s:t] * (1 - sig[s:t])), dA * silu[s:t])
        grad_down[e] = dy_sorted[s:t].t() @ (w_sorted[s:t] * act[s:t])
        grad_gate_up[e] = d_gate_up.t() @ x_sorted[s:t]
        dx_sorted[s:t] = d_gate_up @ gate_up_proj[e].to(acc)
    grad_x = torch.zeros(T, H, dtype=acc, device=x.device).index_add_(0, token, dx_sorted)
    grad_weights = dw_sorted[slot_pos.long()].view(T, k)
    return (grad_x.to(x.dtype), grad_weights.to(weights.dtype), grad_gate_up.to(gate_up_proj.dtype),
            grad_down.to(down_proj.dtype))
