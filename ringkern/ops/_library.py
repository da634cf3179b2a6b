"""Registers the Python side of every ``torch.ops.ringkern`` op.

The schemas and the CUDA kernels live in the native extension ``ringkern._C``. Here each op gets its CPU
kernel (the pure-PyTorch reference, so the dispatcher picks the implementation by device), a fake (meta)
kernel so ``torch.compile`` can trace it, and, for the loss ops called once per step (token_logprobs,
attach_grads), its autograd formula. The per-layer ops have theirs in C++ (csrc/autograd.cpp), where a
call costs a few microseconds of host time instead of tens.
"""
from __future__ import annotations

import torch

from . import reference as ref

try:
    from .. import _C  # noqa: F401  (loading it registers the op schemas and CUDA kernels)
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError("ringkern._C is not built: install with `pip install --no-build-isolation .`") from err


def _register_rms_norm() -> None:
    torch.library.register_kernel("ringkern::rms_norm", "cpu", ref.rms_norm)
    torch.library.register_kernel("ringkern::rms_norm_backward", "cpu", ref.rms_norm_backward)

    @torch.library.register_fake("ringkern::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("ringkern::rms_norm_backward")
    def _(grad_out, x, weight, eps):
        return torch.empty_like(x), torch.empty_like(weight)


_register_rms_norm()


def _mtp_input_cpu(embeds, hidden, enorm_weight, hnorm_weight, eh_weight, eps):
    normed = torch.cat([ref.rms_norm(embeds, enorm_weight, eps), ref.rms_norm(hidden, hnorm_weight, eps)], dim=-1)
    return normed @ eh_weight.t(), normed


def _mtp_input_backward_cpu(grad_out, embeds, hidden, normed, enorm_weight, hnorm_weight, eh_weight, eps):
    grad_normed = grad_out @ eh_weight  # [N, 2H]
    grad_e, grad_h = grad_normed.chunk(2, dim=-1)
    grad_embeds, grad_enorm = ref.rms_norm_backward(grad_e, embeds, enorm_weight, eps)
    grad_hidden, grad_hnorm = ref.rms_norm_backward(grad_h, hidden, hnorm_weight, eps)
    return grad_embeds, grad_hidden, grad_enorm, grad_hnorm, grad_out.t() @ normed


def _register_mtp_input() -> None:
    torch.library.register_kernel("ringkern::mtp_input", "cpu", _mtp_input_cpu)
    torch.library.register_kernel("ringkern::mtp_input_backward", "cpu", _mtp_input_backward_cpu)

    @torch.library.register_fake("ringkern::mtp_input")
    def _(embeds, hidden, enorm_weight, hnorm_weight, eh_weight, eps):
        N, H = embeds.shape
        return embeds.new_empty(N, H), embeds.new_empty(N, 2 * H)

    @torch.library.register_fake("ringkern::mtp_input_backward")
    def _(grad_out, embeds, hidden, normed, enorm_weight, hnorm_weight, eh_weight, eps):
        return (torch.empty_like(embeds), torch.empty_like(hidden), torch.empty_like(enorm_weight),
                torch.empty_like(hnorm_weight), torch.empty_like(eh_weight))


_register_mtp_input()


def _register_decode() -> None:
    from .inference import decode_attention_reference, sample_tokens_reference

    torch.library.register_kernel("ringkern::decode_attention", "cpu", decode_attention_reference)
    torch.library.register_kernel("ringkern::sample_tokens", "cpu", sample_tokens_reference)

    @torch.library.register_fake("ringkern::decode_attention")
    def _(q, k_cache, v_cache, positions):
        return torch.empty_like(q)

    @torch.library.register_fake("ringkern::sample_tokens")
    def _(logits, noise_keys, steps, temperature):
        B = logits.shape[0]
        return logits.new_empty(B, dtype=torch.long), logits.new_empty(B, dtype=torch.float32)


_register_decode()


def _register_qkv_norm_rope() -> None:
    torch.library.register_kernel("ringkern::qkv_norm_rope", "cpu", ref.qkv_norm_rope)

    @torch.library.register_fake("ringkern::qkv_norm_rope")
    def _(qkv, q_weight, k_weight, cos, sin, n_heads, n_kv, eps, k_cache, v_cache, positions):
        B, T, C = qkv.shape
        D = C // (n_heads + 2 * n_kv)
        return (qkv.new_empty(B, n_heads, T, D), qkv.new_empty(B, n_kv, T, D), qkv.new_empty(B, n_kv, T, D))


_register_qkv_norm_rope()


def _register_router_logits() -> None:
    def router_logits_cpu(x, weight):
        with torch.autocast("cpu", enabled=False):  # fp32 logits whatever autocast says
            return torch.nn.functional.linear(x.float(), weight.float())

    torch.library.register_kernel("ringkern::router_logits", "cpu", router_logits_cpu)

    @torch.library.register_fake("ringkern::router_logits")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


_register_router_logits()


def _register_moe() -> None:
    from . import moe_reference as moe_ref
    from .inference import moe_block_inference_reference

    def route_cpu(router_logits, expert_bias, n_group, topk_group, top_k, routed_scaling_factor, renormalize,
                  expert_ids):
        return ref.moe_route(router_logits, expert_bias, n_group=n_group, topk_group=topk_group, top_k=top_k,
                             routed_scaling_factor=routed_scaling_factor, renormalize=renormalize,
                             expert_ids=expert_ids)

    torch.library.register_kernel("ringkern::moe_route", "cpu", route_cpu)
    torch.library.register_kernel("ringkern::moe_route_backward", "cpu", moe_ref.moe_route_backward)
    torch.library.register_kernel("ringkern::moe_dispatch", "cpu", moe_ref.moe_dispatch)
    torch.library.register_kernel("ringkern::moe_experts_forward", "cpu", moe_ref.moe_experts_forward)
    torch.library.register_kernel("ringkern::moe_experts_backward", "cpu", moe_ref.moe_experts_backward)

    @torch.library.register_fake("ringkern::moe_route")
    def _(router_logits, expert_bias, n_group, topk_group, top_k, routed_scaling_factor, renormalize, expert_ids):
        T, E = router_logits.shape
        return (router_logits.new_empty(T, top_k, dtype=torch.float32),
                router_logits.new_empty(T, top_k, dtype=torch.int32),
                router_logits.new_empty(E, dtype=torch.int32))

    @torch.library.register_fake("ringkern::moe_route_backward")
    def _(grad_weights, router_logits, expert_ids, routed_scaling_factor, renormalize):
        return torch.empty_like(router_logits, dtype=torch.float32)

    @torch.library.register_fake("ringkern::moe_dispatch")
    def _(expert_ids, num_experts):
        S = expert_ids.numel()
        return (expert_ids.new_empty(num_experts, dtype=torch.int32), expert_ids.new_empty(num_experts, dtype=torch.int32),
                expert_ids.new_empty(S, dtype=torch.int32), expert_ids.new_empty(S, dtype=torch.int32))

    @torch.library.register_fake("ringkern::moe_experts_forward")
    def _(x, weights, expert_ids, gate_up_proj, down_proj, atomic_combine=False):
        S = expert_ids.numel()
        E = gate_up_proj.shape[0]
        return (torch.empty_like(x), x.new_empty(S, gate_up_proj.shape[1]), x.new_empty(S, dtype=torch.int32),
                x.new_empty(S, dtype=torch.int32), x.new_empty(E, dtype=torch.int32))

    torch.library.register_kernel("ringkern::moe_block_inference", "cpu", moe_block_inference_reference)

    @torch.library.register_fake("ringkern::moe_block_inference")
    def _(x, weights, expert_ids, gate_up_proj, down_proj, shared_gate, shared_up, shared_down):
        return torch.empty_like(x)

    @torch.library.register_fake("ringkern::moe_experts_backward")
    def _(grad_y, x, weights, gate_up_proj, down_proj, gate_up_out, sorted_slot, slot_pos, offsets):
        return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(gate_up_proj),
                torch.empty_like(down_proj))


_register_moe()


# ------------------------------------------------------------- log-probs and losses

ICEPOP_METRICS = ("masked_low_frac", "masked_high_frac", "mean_abs_logp_diff", "max_prob_gap", "kl_train_infer",
                  "clip_frac", "entropy", "num_tokens")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """hidden @ weight^T / temperature in the accumulation dtype, rounded like the reference ([T, V])."""
    return (hidden @ weight.t()).to(_acc_dtype(hidden)) / temperature


def _softmax_grads(z, hidden, weight, targets, temperature, grad_logp, grad_entropy, need_grad_hidden,
                   need_grad_weight):
    """(grad_hidden, grad_weight) of sum(grad_logp * logp + grad_entropy * entropy) in closed form, from the
    scaled logits z: d/dz_i = grad_logp * (onehot_i - p_i) - grad_entropy * p_i * (z_i - sum_j p_j z_j).
    Kernels run below autograd, so the CPU path states the gradient instead of recording a graph."""
    g_logp, g_ent = grad_logp.to(z.dtype).unsqueeze(1), grad_entropy.to(z.dtype).unsqueeze(1)
    p = torch.softmax(z, dim=-1)
    mean_z = (p * z).sum(-1, keepdim=True)
    d_logits = (-p * (g_logp + g_ent * (z - mean_z))).scatter_add_(1, targets.long().unsqueeze(1), g_logp)
    d_logits = d_logits / temperature
    grad_hidden = (d_logits @ weight.to(z.dtype)).to(hidden.dtype) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = (d_logits.t() @ hidden.to(z.dtype)).to(weight.dtype) if need_grad_weight else weight.new_empty(0)
    return grad_hidden, grad_weight


def _loss_grads(coef, hidden, weight, targets, temperature, need_grad_hidden, need_grad_weight):
    """Gradients of a loss whose d(loss)/d(logp_t) is coef [T] (the CUDA kernels' per-token coefficient)."""
    if not (need_grad_hidden or need_grad_weight):
        return hidden.new_empty(0), weight.new_empty(0)
    z = _scaled_logits(hidden, weight, temperature)
    return _softmax_grads(z, hidden, weight, targets, temperature, coef, torch.zeros_like(coef), need_grad_hidden,
                          need_grad_weight)


def _into_buffer(grad_weight: torch.Tensor, grad_weight_acc: torch.Tensor | None) -> torch.Tensor:
    """Adds grad_weight to the caller's fp32 buffer when there is one (then returns an empty tensor)."""
    if grad_weight_acc is None or grad_weight.dim() != 2:
        return grad_weight
    grad_weight_acc.add_(grad_weight)
    return grad_weight.new_empty(0)


def _aggregation_weights(mask: torch.Tensor, cu_seqlens: torch.Tensor, aggregation: str, dtype) -> torch.Tensor:
    """w_t with loss = -sum_t w_t * term_t: 1 / n_tokens, or 1 / (seq tokens x sequences with loss tokens)."""
    maskf = mask.to(dtype)
    if aggregation == "token-mean" or mask.numel() == 0:
        return maskf / maskf.sum().clamp_min(1)
    seq_idx = ref._sequence_index(cu_seqlens, mask.shape[0])
    seq_cnt = maskf.new_zeros(cu_seqlens.numel() - 1).index_add_(0, seq_idx, maskf)
    return maskf / (seq_cnt[seq_idx].clamp_min(1) * (seq_cnt > 0).sum().clamp_min(1))


def _icepop_coef(logp, old_logprobs, rollout_logprobs, advantages, loss_mask, cu_seqlens, alpha, beta, eps_low,
                 eps_high, correction, aggregation, tis_cap) -> torch.Tensor:
    """d(loss)/d(logp_t) of the reference's IcePop loss (what the CUDA row kernel computes per token)."""
    old, rollout, adv = (t.to(logp.dtype) for t in (old_logprobs, rollout_logprobs, advantages))
    corr = ref.correction_weights((old - rollout).exp(), correction, alpha=alpha, beta=beta, tis_cap=tis_cap)
    scale = _aggregation_weights(loss_mask.bool(), cu_seqlens, aggregation, logp.dtype) * corr
    ratio = (logp - old).exp()
    clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
    return torch.where(clipped | (scale == 0), torch.zeros_like(ratio), -scale * adv * ratio)


def _token_logprobs_cpu(hidden, weight, targets, temperature):
    logp, entropy = ref.token_logprobs(hidden, weight, targets, temperature, return_entropy=True)
    dtype = _acc_dtype(hidden)
    target_logit = (hidden.to(dtype) * weight[targets].to(dtype)).sum(-1) / temperature
    return logp, entropy, target_logit - logp


def _token_logprobs_backward_cpu(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature,
                                 need_grad_hidden, need_grad_weight):
    z = _scaled_logits(hidden, weight, temperature)
    return _softmax_grads(z, hidden, weight, targets, temperature, grad_logp, grad_entropy, need_grad_hidden,
                          need_grad_weight)


def _icepop_policy_loss_cpu(hidden, weight, targets, old_logprobs, rollout_logprobs, advantages, loss_mask,
                            cu_seqlens, alpha, beta, eps_low, eps_high, temperature, correction, aggregation,
                            tis_cap, need_grad_hidden, need_grad_weight, grad_weight_acc):
    loss, metrics = ref.icepop_policy_loss(
        hidden, weight, targets, old_logprobs, rollout_logprobs, advantages, loss_mask, cu_seqlens, alpha=alpha,
        beta=beta, eps_low=eps_low, eps_high=eps_high, temperature=temperature, correction=correction,
        aggregation=aggregation, tis_cap=tis_cap)
    metrics = torch.stack([metrics[name] for name in ICEPOP_METRICS]).to(loss.dtype)
    logp = ref.token_logprobs(hidden, weight, targets, temperature)
    coef = _icepop_coef(logp, old_logprobs, rollout_logprobs, advantages, loss_mask, cu_seqlens, alpha, beta,
                        eps_low, eps_high, correction, aggregation, tis_cap)
    grad_hidden, grad_weight = _loss_grads(coef, hidden, weight, targets, temperature, need_grad_hidden,
                                           need_grad_weight)
    return loss, metrics, grad_hidden, _into_buffer(grad_weight, grad_weight_acc)


def _linear_cross_entropy_cpu(hidden, weight, targets, ignore_index, token_weights, reduction, need_grad_hidden,
                              need_grad_weight, grad_weight_acc):
    loss = ref.linear_cross_entropy(hidden, weight, targets, ignore_index, token_weights, reduction)
    valid = targets != ignore_index
    scale = valid.to(loss.dtype) if token_weights is None else token_weights.to(loss.dtype) * valid
    if reduction == "mean":
        scale = scale / scale.sum().clamp_min(torch.finfo(torch.float32).tiny)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    grad_hidden, grad_weight = _loss_grads(-scale, hidden, weight, safe_targets, 1.0, need_grad_hidden,
                                           need_grad_weight)
    return loss, grad_hidden, _into_buffer(grad_weight, grad_weight_acc)


def _fake_grads(hidden, weight, need_grad_hidden, need_grad_weight, grad_weight_acc=None):
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    in_buffer = grad_weight_acc is not None or not need_grad_weight
    return grad_hidden, weight.new_empty(0) if in_buffer else torch.empty_like(weight)


def _register_logprob_ops() -> None:
    torch.library.register_kernel("ringkern::token_logprobs", "cpu", _token_logprobs_cpu)
    torch.library.register_kernel("ringkern::token_logprobs_backward", "cpu", _token_logprobs_backward_cpu)
    torch.library.register_kernel("ringkern::icepop_policy_loss", "cpu", _icepop_policy_loss_cpu)
    torch.library.register_kernel("ringkern::linear_cross_entropy", "cpu", _linear_cross_entropy_cpu)

    @torch.library.register_fake("ringkern::token_logprobs")
    def _(hidden, weight, targets, temperature):
        return tuple(hidden.new_empty(hidden.shape[0], dtype=_acc_dtype(hidden)) for _ in range(3))

    @torch.library.register_fake("ringkern::token_logprobs_backward")
    def _(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, need_grad_hidden,
          need_grad_weight):
        return _fake_grads(hidden, weight, need_grad_hidden, need_grad_weight)

    @torch.library.register_fake("ringkern::icepop_policy_loss")
    def _(hidden, weight, targets, old_logprobs, rollout_logprobs, advantages, loss_mask, cu_seqlens, alpha, beta,
          eps_low, eps_high, temperature, correction, aggregation, tis_cap, need_grad_hidden, need_grad_weight,
          grad_weight_acc):
        loss = hidden.new_empty((), dtype=_acc_dtype(hidden))
        metrics = hidden.new_empty(len(ICEPOP_METRICS), dtype=_acc_dtype(hidden))
        return (loss, metrics, *_fake_grads(hidden, weight, need_grad_hidden, need_grad_weight, grad_weight_acc))

    @torch.library.register_fake("ringkern::linear_cross_entropy")
    def _(hidden, weight, targets, ignore_index, token_weights, reduction, need_grad_hidden, need_grad_weight,
          grad_weight_acc):
        loss = hidden.new_empty((), dtype=_acc_dtype(hidden))
        return (loss, *_fake_grads(hidden, weight, need_grad_hidden, need_grad_weight, grad_weight_acc))

    def setup_context(ctx, inputs, output):
        hidden, weight, targets, temperature = inputs
        _, entropy, lse = output
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature = temperature

    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden, grad_weight = torch.ops.ringkern.token_logprobs_backward(
            grad_logp.contiguous(), grad_entropy.contiguous(), hidden, weight, targets, lse, entropy,
            ctx.temperature, need_hidden, need_weight)
        return grad_hidden if need_hidden else None, grad_weight if need_weight else None, None, None

    torch.library.register_autograd("ringkern::token_logprobs", backward, setup_context=setup_context)


def _register_attach_grads() -> None:
    def attach_grads(loss, hidden, weight, grad_hidden, grad_weight, weight_grad_in_buffer):
        return loss.clone()

    for device in ("cpu", "cuda"):
        torch.library.register_kernel("ringkern::attach_grads", device, attach_grads)

    @torch.library.register_fake("ringkern::attach_grads")
    def _(loss, hidden, weight, grad_hidden, grad_weight, weight_grad_in_buffer):
        return torch.empty_like(loss)

    def setup_context(ctx, inputs, output):
        _, _, _, grad_hidden, grad_weight, weight_grad_in_buffer = inputs
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_grad_in_buffer = weight_grad_in_buffer

    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.weight_grad_in_buffer:
            # The buffer already holds d(loss)/d(weight): only an upstream gradient of 1 keeps it right.
            torch._assert_async(grad == 1, "ringkern: grad_weight_buffer needs the loss backpropagated with "
                                           "gradient 1 (scale the loss's inputs instead)")
        # A gradient that was not computed comes as a 1-D [0] placeholder (the real ones are [T, H] / [V, H]).
        scaled_hidden = grad_hidden * grad if grad_hidden.dim() == 2 else None
        scaled_weight = grad_weight * grad if grad_weight.dim() == 2 else None
        return None, scaled_hidden, scaled_weight, None, None, None

    torch.library.register_autograd("ringkern::attach_grads", backward, setup_context=setup_context)


_register_logprob_ops()
_register_attach_grads()
