"""The ops every ringkern model, engine and trainer calls.

Ops backed by ``torch.ops.ringkern`` dispatch by device: CUDA kernels from ``csrc/`` on the GPU, the
pure-PyTorch references of :mod:`ringkern.ops.reference` on the CPU. The remaining functions are the
references themselves until their kernels land; callers never branch on the device.
"""
from __future__ import annotations

import torch

from . import _library  # noqa: F401  (registers CPU, fake and autograd kernels)
from . import reference
from ._library import ICEPOP_METRICS
from .reference import (AGGREGATIONS, CORRECTIONS, apply_partial_rope, attention, expert_bias_update,
                        rope_cos_sin, rope_frequencies, rope_inv_freq)

__all__ = ["AGGREGATIONS", "CORRECTIONS", "ICEPOP_METRICS", "apply_partial_rope", "attention",
           "expert_bias_update", "icepop_policy_loss", "linear_cross_entropy", "moe_dispatch", "moe_experts",
           "moe_route", "mtp_input", "qkv_norm_rope", "rms_norm", "router_logits", "rope_cos_sin", "rope_frequencies",
           "rope_inv_freq", "token_logprobs"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math, output in x's dtype); differentiable."""
    return torch.ops.ringkern.rms_norm(x.contiguous(), weight, eps)


def _gemm_dtype(activations: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM of these activations runs in: autocast's when it is on (the trainer keeps fp32 master
    weights), else the activations'."""
    device_type = activations.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else activations.dtype


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention inputs (q, k, v) from the fused QKV projection (contract: :func:`reference.qkv_norm_rope`),
    differentiable: the composition with the :func:`rms_norm` kernel. The cached inference steps use the
    one-kernel ``ops.inference.qkv_norm_rope``."""
    return reference.qkv_norm_rope(qkv, q_weight, k_weight, cos, sin, n_heads, n_kv, eps, norm=rms_norm)


def mtp_input(embeds: torch.Tensor, hidden: torch.Tensor, enorm_weight: torch.Tensor,
              hnorm_weight: torch.Tensor, eh_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The MTP layer's input eh_proj(cat[enorm(embeds), hnorm(hidden)]) (contract: :func:`reference.mtp_input`).

    embeds, hidden [..., H], norm weights [H], eh_weight [H, 2H] -> [..., H]; differentiable in all five.
    On CUDA the norms write straight into the halves of the GEMM operand (no concatenation, no separate
    normed copies). Under autocast the GEMM operands run in autocast's dtype (the norm weights may stay fp32).
    """
    dtype = _gemm_dtype(embeds)
    H = embeds.shape[-1]
    with torch.autocast(embeds.device.type, enabled=False):
        out, _ = torch.ops.ringkern.mtp_input(embeds.to(dtype).reshape(-1, H).contiguous(),
                                              hidden.to(dtype).reshape(-1, H).contiguous(), enorm_weight.contiguous(),
                                              hnorm_weight.contiguous(), eh_weight.to(dtype).contiguous(), float(eps))
    return out.reshape(embeds.shape)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits x [N, H] @ weight [E, H]^T, as the published gate computes them (fp32 math).

    On CUDA with bf16 x and weight: one cuBLAS GEMM reading bf16 and writing fp32 (no fp32 copies; the values
    are those of the upcast inputs); otherwise the fp32 GEMM of the upcasts. fp32 under autocast too.
    Differentiable in both.
    """
    return torch.ops.ringkern.router_logits(x, weight)


def moe_route(router_logits: torch.Tensor, expert_bias: torch.Tensor, *, n_group: int, topk_group: int,
              top_k: int, routed_scaling_factor: float, renormalize: bool = True,
              expert_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring 2.0 sigmoid group-limited router (contract: :func:`reference.moe_route`); one fused kernel on CUDA.

    Returns (weights [T, k] fp32, expert_ids [T, k] int32, tokens_per_expert [E] int32); the weights are
    differentiable w.r.t. router_logits. With expert_ids (replay) only the weights and counts are computed.
    """
    return torch.ops.ringkern.moe_route(router_logits.contiguous(), expert_bias.contiguous(),
                                        n_group, topk_group, top_k, float(routed_scaling_factor), renormalize,
                                        None if expert_ids is None else expert_ids.contiguous())


def moe_dispatch(expert_ids: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of token slots (t*k + j) by expert, on the device without a host sync.

    Returns int32 (tokens_per_expert [E], offsets [E] cumulative ends, sorted_slot [T*k], slot_pos [T*k]).
    """
    return torch.ops.ringkern.moe_dispatch(expert_ids.contiguous(), num_experts)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, atomic_combine: bool = False) -> torch.Tensor:
    """Routed SwiGLU experts combined with their routing weights (contract: :func:`reference.moe_experts`).

    x [T, H], weights [T, k] fp32, expert_ids [T, k], gate_up_proj [E, 2I, H], down_proj [E, H, I] -> [T, H].
    Differentiable in x, weights and both projections. On CUDA with bf16 tensors: grouped GEMMs over
    expert-sorted rows, no host sync (graph-capturable), deterministic; other CUDA dtypes use the reference.
    atomic_combine=True opts in to the combine fused into the down GEMM's epilogue with fp32 atomics (the
    CUTLASS grouped path, T above the few-rows kernels' range): not bitwise reproducible run to run.
    Under autocast x and both projections run in autocast's dtype (the trainer keeps fp32 master weights).
    """
    if x.is_cuda:
        dtype = _gemm_dtype(x)
        x, gate_up_proj, down_proj = x.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    if x.is_cuda and not (x.dtype == gate_up_proj.dtype == down_proj.dtype == torch.bfloat16):
        return reference.moe_experts(x, weights, expert_ids, gate_up_proj, down_proj)
    return torch.ops.ringkern.moe_experts_forward(x.contiguous(), weights.contiguous(),
                                                  expert_ids.contiguous(), gate_up_proj.contiguous(),
                                                  down_proj.contiguous(), atomic_combine)[0]


# ------------------------------------------------------------- log-probs and losses
# CUDA: chunked fused kernels (csrc/logprob/) that never hold [T, V] logits; the losses compute their
# gradients in the forward pass and attach them to the loss (scaled by the upstream gradient in backward).


def _gemm_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight in the dtype their product runs in (:func:`_gemm_dtype`). The casts are differentiable."""
    dtype = _gemm_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight^T / temperature)[targets], fp32 [T] (contract: :func:`reference.token_logprobs`).

    hidden [T, H], weight [V, H] (cast to hidden's dtype, or autocast's), targets [T] int64. With
    return_entropy also the entropy [T].
    Differentiable w.r.t. hidden and weight (the backward recomputes the logits chunk by chunk).
    """
    hidden, weight = _gemm_operands(hidden, weight)
    logp, entropy, _ = torch.ops.ringkern.token_logprobs(hidden, weight, targets, float(temperature))
    return (logp, entropy) if return_entropy else logp


def _needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _attach_grads(loss, hidden, weight, grad_hidden, grad_weight, weight_grad_in_buffer: bool) -> torch.Tensor:
    """Makes the loss differentiable w.r.t. hidden and weight through gradients computed in its forward."""
    if not (_needs_grad(hidden) or _needs_grad(weight)):
        return loss
    return torch.ops.ringkern.attach_grads(loss, hidden, weight, grad_hidden, grad_weight, weight_grad_in_buffer)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, token_weights: torch.Tensor | None = None,
                         reduction: str = "mean", *, grad_weight_buffer: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Cross-entropy of hidden @ weight^T against targets (contract: :func:`reference.linear_cross_entropy`).

    reduction "sum"/"mean": one fused pass computes the loss and its gradients. With grad_weight_buffer
    (fp32 [V, H]) d(loss)/d(weight) is added there during the forward pass instead of reaching weight.grad;
    the loss must then be backpropagated with gradient 1. reduction "none" goes through token_logprobs.
    """
    if reduction == "none":
        valid = targets != ignore_index
        logp = token_logprobs(hidden, weight, torch.where(valid, targets, torch.zeros_like(targets)))
        token_w = valid.float() if token_weights is None else token_weights.float() * valid
        return -logp * token_w
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: expected 'none', 'sum' or 'mean'")
    hidden, weight = _gemm_operands(hidden, weight)
    need_hidden, need_weight = _needs_grad(hidden), _needs_grad(weight)
    loss, grad_hidden, grad_weight = torch.ops.ringkern.linear_cross_entropy(
        hidden.detach(), weight.detach(), targets, ignore_index,
        None if token_weights is None else token_weights.float(), reduction, need_hidden, need_weight,
        grad_weight_buffer if need_weight else None)
    return _attach_grads(loss, hidden, weight, grad_hidden, grad_weight, grad_weight_buffer is not None)


def icepop_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor,
                       loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, *, alpha: float = 0.5,
                       beta: float = 5.0, eps_low: float = 0.2, eps_high: float = 0.2,
                       temperature: float = 1.0, correction: str = "icepop",
                       aggregation: str = "seq-mean-token-mean", tis_cap: float = 2.0,
                       grad_weight_buffer: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped policy loss with the IcePop / TIS / no correction (contract: :func:`reference.icepop_policy_loss`).

    hidden [T, H], weight [V, H], targets [T] int64, old/rollout log-probs and advantages [T] fp32,
    loss_mask [T] bool, cu_seqlens [B+1] int. Returns (loss, metrics: ICEPOP_METRICS -> fp32 scalars).
    One fused pass computes loss, metrics and gradients; grad_weight_buffer as in linear_cross_entropy.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r}: expected one of {CORRECTIONS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    hidden, weight = _gemm_operands(hidden, weight)
    need_hidden, need_weight = _needs_grad(hidden), _needs_grad(weight)
    loss, metrics, grad_hidden, grad_weight = torch.ops.ringkern.icepop_policy_loss(
        hidden.detach(), weight.detach(), targets, old_logprobs, rollout_logprobs, advantages, loss_mask,
        cu_seqlens, float(alpha), float(beta), float(eps_low), float(eps_high), float(temperature), correction,
        aggregation, float(tis_cap), need_hidden, need_weight, grad_weight_buffer if need_weight else None)
    loss = _attach_grads(loss, hidden, weight, grad_hidden, grad_weight, grad_weight_buffer is not None)
    return loss, dict(zip(ICEPOP_METRICS, metrics.unbind()))
