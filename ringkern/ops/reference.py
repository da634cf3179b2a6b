"""Pure-PyTorch references of every hot op in ringkern.

Each function here is (1) the CPU implementation used in training and inference
on machines without a GPU and (2) the oracle every CUDA kernel is tested
against. They favour clarity over speed, but stay vectorized so the ``tiny``
preset trains on two CPU cores.

Shape legend: T tokens, H hidden, V vocabulary, E experts, k experts per token,
I expert intermediate size, B sequences.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 for fp64 inputs (so fp64 calls are exact oracles)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 (or fp64)."""
    xf = _acc(x)
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv_rms * _acc(weight)).to(x.dtype)


def rms_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``rms_norm`` w.r.t. x and weight (fp32 math, results in the inputs' dtypes)."""
    xf, gf, wf = _acc(x), _acc(grad_out), _acc(weight)
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = xf * inv_rms
    grad_weight = (gf * x_hat).reshape(-1, x.shape[-1]).sum(0)
    g_hat = gf * wf
    grad_x = inv_rms * (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def mtp_input(embeds: torch.Tensor, hidden: torch.Tensor, enorm_weight: torch.Tensor,
              hnorm_weight: torch.Tensor, eh_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The MTP layer's input: eh_weight [H, 2H] applied to cat[rms_norm(embeds), rms_norm(hidden)].

    embeds, hidden [..., H] (the embeddings of the tokens one step ahead, the previous depth's normed
    hidden states); the output [..., H] is in embeds' dtype.
    """
    normed = torch.cat([rms_norm(embeds, enorm_weight, eps), rms_norm(hidden, hnorm_weight, eps)], dim=-1)
    return F.linear(normed, eh_weight.to(normed.dtype))


# ---------------------------------------------------------------------------- RoPE


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """inv_freq = 1 / theta^(arange(0, rot, 2) / rot), fp32 [rot/2]."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim).float()


def rope_frequencies(rotary_dim: int, theta: float, rope_scaling: dict | None,
                     max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rot/2], attention_factor) for plain RoPE or YaRN context extension.

    YaRN (``{"type": "yarn", "factor": s, "original_max_position_embeddings": L}``): dims that rotate
    fewer than beta_slow times over L are interpolated (frequency / s), dims rotating more than beta_fast
    times are kept, a linear ramp blends between; cos/sin are scaled by 0.1 ln(s) + 1.
    """
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    base = rope_inv_freq(rotary_dim, theta)
    if kind == "default":
        return base, 1.0
    if kind != "yarn":
        raise ValueError(f"rope_scaling={rope_scaling!r}: expected None, 'default' or 'yarn'")
    factor = float(rope_scaling["factor"])
    original = rope_scaling.get("original_max_position_embeddings") or max_position_embeddings
    beta_fast, beta_slow = rope_scaling.get("beta_fast", 32), rope_scaling.get("beta_slow", 1)

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times into L
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(beta_fast)), 0)
    high = min(math.ceil(dim_of(beta_slow)), rotary_dim - 1)
    high = high + 0.001 if high == low else high
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = base / factor * (1 - keep) + base * keep
    attention_factor = rope_scaling.get("attention_factor") or (0.1 * math.log(factor) + 1 if factor > 1 else 1.0)
    return inv_freq, float(attention_factor)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., rot] (each half repeated, NeoX layout) for integer positions [...]."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., rot/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., rot]
    return angles.cos(), angles.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` channels of each head; the rest pass through.

    x: [B, heads, T, D]; cos/sin: [B, T, rot] (broadcast over heads).
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = x_rot.float() * cos + rotated * sin
    return torch.cat([out.to(x.dtype), x_pass], dim=-1)


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, eps: float,
                  k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None, norm=rms_norm
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention inputs from the fused projection qkv [B, T, (n_heads + 2 n_kv) D]: q [B, n_heads, T, D],
    k, v [B, n_kv, T, D], with q and k normed by ``norm`` (when the weights are given) and rotated by
    :func:`apply_partial_rope`. Given k_cache, v_cache [R >= B, n_kv, S, D] and positions [B, T], also writes
    k and v at those positions of cache rows 0..B-1 (the contract of ``torch.ops.ringkern.qkv_norm_rope``)."""
    B, T, _ = qkv.shape
    D = qkv.shape[-1] // (n_heads + 2 * n_kv)
    q, k, v = (t.reshape(B, T, -1, D) for t in qkv.split([n_heads * D, n_kv * D, n_kv * D], dim=-1))
    if q_weight is not None:
        q, k = norm(q, q_weight, eps), norm(k, k_weight, eps)
    q, k = apply_partial_rope(q.transpose(1, 2), cos, sin), apply_partial_rope(k.transpose(1, 2), cos, sin)
    v = v.transpose(1, 2)
    if k_cache is not None:
        rows = torch.arange(B, device=qkv.device).unsqueeze(1).expand(B, T)
        k_cache[rows, :, positions] = k.transpose(1, 2)  # indexed view: [B, T, n_kv, D]
        v_cache[rows, :, positions] = v.transpose(1, 2)
    return q.contiguous(), k.contiguous(), v.contiguous()


# ----------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query scaled dot-product attention, scale 1/sqrt(D).

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; key_padding_mask: [B, Tk] bool (True = attend).
    With causal and Tq < Tk the queries are the last Tq positions (decode with a cache).
    """
    mask = None
    if causal or key_padding_mask is not None:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        if causal:
            mask = torch.tril(mask, diagonal=tk - tq)
        mask = mask.view(1, 1, tq, tk)
        if key_padding_mask is not None:
            # Each query also sees itself, so padding rows stay finite and never poison real ones.
            own = torch.eye(tq, tk, dtype=torch.bool, device=q.device).roll(tk - tq, dims=1)
            mask = (mask & key_padding_mask.view(-1, 1, 1, tk)) | own
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------- MoE


def _sorted_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def moe_route(router_logits: torch.Tensor, expert_bias: torch.Tensor, *, n_group: int, topk_group: int,
              top_k: int, routed_scaling_factor: float, renormalize: bool = True,
              expert_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid group-limited routing with a selection-only expert bias (Ring 2.0 router).

    router_logits: [T, E] fp32, expert_bias: [E] fp32, expert_ids: optional [T, k] int (replay).
    Returns (weights [T, k] fp32, expert_ids [T, k] int32, tokens_per_expert [E] int32).
    Ties break towards the lower group / expert index, here and in the CUDA kernel.
    """
    T, E = router_logits.shape
    scores = torch.sigmoid(router_logits.float())  # [T, E]
    if expert_ids is None:
        biased = scores + expert_bias.float()
        grouped = biased.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        kept = _sorted_topk_indices(group_scores, topk_group)  # [T, topk_group]
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_keep = group_keep.repeat_interleave(E // n_group, dim=1)  # [T, E]
        masked = biased.masked_fill(~expert_keep, float("-inf"))
        expert_ids = _sorted_topk_indices(masked, top_k)
    ids = expert_ids.long()
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return weights, ids.to(torch.int32), counts.to(torch.int32)


def split_gate_up(gate_up: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views of a gate_up tensor along ``dim`` (size 2I).

    The experts' gate and up projections are stored interleaved, index 2i holding gate_i and 2i + 1 up_i
    (weights along their rows, projections along their columns), so that a GEMM tile holds both halves of
    every SwiGLU it computes and can apply the activation in its epilogue.
    """
    pairs = gate_up.unfold(dim, 2, 2)  # dim -> I, a new last dim of 2
    return pairs[..., 0], pairs[..., 1]


def join_gate_up(gate: torch.Tensor, up: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The interleaved gate_up tensor of :func:`split_gate_up`'s halves (along ``dim``)."""
    dim = dim % gate.dim()
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts combined with their routing weights: y_t = sum_j w_tj * expert_{id_tj}(x_t).

    x: [T, H]; weights: [T, k] fp32; expert_ids: [T, k]; gate_up_proj: [E, 2I, H] (gate and up rows
    interleaved, see :func:`split_gate_up`); down_proj: [E, H, I]. Returns [T, H] in x's dtype, combined in fp32.
    """
    T, H = x.shape
    E = gate_up_proj.shape[0]
    k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert
    token_of_slot = order // k
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    x_sorted = x[token_of_slot]

    def expert(rows: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = split_gate_up(rows @ gate_up_proj[e].t())
        return (F.silu(gate) * up) @ down_proj[e].t()

    outs = [expert(rows, e) for e, rows in enumerate(torch.split(x_sorted, counts)) if rows.shape[0]]
    # No rows at all: expert 0 over the empty rows keeps both projections in the graph (zero grads, not None).
    y_sorted = torch.cat(outs) if outs else expert(x_sorted, 0)
    y_sorted = _acc(y_sorted) * _acc(weights.reshape(-1)[order]).unsqueeze(-1)
    return combine_slots(y_sorted, order, T, k).to(x.dtype)


def combine_slots(y_sorted: torch.Tensor, order: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """Each token's sum of its k slot outputs: y_sorted [T k, H] holds the slots in ``order`` -> [T, H].
    A gather back to slot order, then a fixed-order sum over k: deterministic on every device
    (``index_add_`` accumulates with atomics on CUDA)."""
    return y_sorted[torch.argsort(order)].reshape(T, k, y_sorted.shape[-1]).sum(1)


def expert_bias_update(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor,
                       rate: float = 1e-3) -> torch.Tensor:
    """Aux-loss-free balancing step: bias += rate * (sign(mean_load - load) - mean(sign(...))). In place."""
    load = tokens_per_expert.float()
    direction = torch.sign(load.mean() - load)
    expert_bias.add_(rate * (direction - direction.mean()))
    return expert_bias


# ------------------------------------------------------------- log-probs and losses


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight^T / temperature)[targets] in fp32 ([T]), optionally with the entropy [T]."""
    logits = _acc(hidden @ weight.t()) / temperature  # [T, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, token_weights: torch.Tensor | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of hidden @ weight^T against targets; ignored targets contribute 0.

    reduction: "none" ([T]), "sum", or "mean" (over the weight of non-ignored tokens; 0 when there are none).
    """
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    nll = -token_logprobs(hidden, weight, safe_targets)
    token_w = valid.float() if token_weights is None else token_weights.float() * valid
    nll = nll * token_w
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / token_w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"reduction={reduction!r}: expected 'none', 'sum' or 'mean'")


CORRECTIONS = ("icepop", "tis", "none")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")


def icepop_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor,
                       loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, *, alpha: float = 0.5,
                       beta: float = 5.0, eps_low: float = 0.2, eps_high: float = 0.2,
                       temperature: float = 1.0, correction: str = "icepop",
                       aggregation: str = "seq-mean-token-mean", tis_cap: float = 2.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped policy loss with the IcePop (or TIS / no) train-inference correction.

    k = exp(old - rollout) (no gradient); icepop weight = k if alpha <= k <= beta else 0;
    tis weight = min(k, tis_cap); none = 1. r = exp(logp - old);
    term = weight * min(r A, clip(r, 1-eps_low, 1+eps_high) A) on loss tokens.
    Dropped tokens still count in the denominators. Returns (loss, metrics), metrics fp32 scalars.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r}: expected one of {CORRECTIONS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    logp, entropy = token_logprobs(hidden, weight, targets, temperature, return_entropy=True)
    mask = loss_mask.bool()
    old, rollout, adv = (t.to(logp.dtype) for t in (old_logprobs, rollout_logprobs, advantages))

    log_k = old - rollout
    k = log_k.exp()
    corr = correction_weights(k, correction, alpha=alpha, beta=beta, tis_cap=tis_cap)

    ratio = (logp - old).exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    terms = torch.where(mask, corr * surrogate, torch.zeros_like(surrogate))
    n_tokens = mask.sum()
    denom = n_tokens.clamp_min(1).to(terms.dtype)

    if aggregation == "token-mean":
        loss = -terms.sum() / denom
    else:
        seq_idx = _sequence_index(cu_seqlens, targets.shape[0])
        n_seq = cu_seqlens.numel() - 1
        seq_sum = terms.new_zeros(n_seq).index_add_(0, seq_idx, terms)
        seq_cnt = terms.new_zeros(n_seq).index_add_(0, seq_idx, mask.to(terms.dtype))
        has_tokens = seq_cnt > 0
        per_seq = seq_sum / seq_cnt.clamp_min(1)
        loss = -(per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)

    with torch.no_grad():
        fmask = mask.to(terms.dtype)
        clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
        metrics = {
            "masked_low_frac": ((k < alpha).float() * fmask).sum() / denom,
            "masked_high_frac": ((k > beta).float() * fmask).sum() / denom,
            "mean_abs_logp_diff": (log_k.abs() * fmask).sum() / denom,
            "max_prob_gap": torch.cat([((old.exp() - rollout.exp()).abs() * fmask), fmask.new_zeros(1)]).max(),
            # KL(train || infer) from samples of the inference policy: E_infer[k log k - (k - 1)] >= 0.
            "kl_train_infer": ((k * log_k - (k - 1)) * fmask).sum() / denom,
            "clip_frac": (clipped.float() * fmask).sum() / denom,
            "entropy": (entropy.detach() * fmask).sum() / denom,
            "num_tokens": n_tokens.to(terms.dtype),
        }
    return loss, metrics


def correction_weights(k: torch.Tensor, correction: str, *, alpha: float, beta: float,
                       tis_cap: float) -> torch.Tensor:
    """Per-token weight of the train/inference ratio k: IcePop keeps k inside [alpha, beta] and drops the
    rest, TIS truncates at tis_cap, none is 1."""
    if correction == "icepop":
        return torch.where((k >= alpha) & (k <= beta), k, torch.zeros_like(k))
    if correction == "tis":
        return k.clamp(max=tis_cap)
    return torch.ones_like(k)


def _sequence_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sequence number of each of the T tokens, from cumulative lengths [B+1]."""
    positions = torch.arange(num_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
