"""Sync-free ops for the inference engine: attention over a KV cache, MoE routing and routed experts.

A CUDA graph can only capture work that never waits for the host. The references in
:mod:`ringkern.ops.reference` sync in two places that matter for decoding: ``torch.bincount`` (the CUDA
kernel reads the input's max back to size its output) and the per-expert loop of ``moe_experts``
(``.tolist()`` of the counts). Routing needs nothing here: ``ops.moe_route`` is one sync-free kernel
on CUDA. The functions here compute the rest without a sync:

- ``moe_experts``: on CUDA with bf16 weights, ``ops.moe_experts`` (the capturable grouped-GEMM kernels
  of ``csrc/moe``); for other CUDA dtypes, a gathered-weights formulation
  (each (token, expert) pair gathers its expert's matrices and runs a batched matmul) for decode-sized
  calls and under capture, chunked so its workspace stays bounded; on the CPU, where syncs cost
  nothing, the reference itself.
- ``moe_block``: ``moe_experts`` plus the shared expert; on CUDA one op whose few-rows kernels run the shared
  expert beside the routed ones (decode: one launch pair instead of seven kernels for the shared MLP).
- ``qkv_norm_rope``: the fused QKV projection split into heads, q/k norms, RoPE and the decode step's
  cache write in one kernel (``csrc/attention/qkv_norm_rope.cu``).
- ``sample_tokens_reference``: the contract (and CPU kernel) of the decode step's fused token draw,
  ``torch.ops.ringkern.sample_tokens`` (``csrc/sampling/sample_tokens.cu``).
- ``cached_attention``: queries attend to a cache row's keys at positions <= their own (the mask from
  ``cache_attention_mask``, made once per decode step for all layers).

Both expert formulations combine the k expert outputs of a token in fp32 in a fixed order (no atomics),
so repeated runs are bitwise identical. Shape legend: T tokens, H hidden, E experts, k experts per token,
I expert intermediate size, B sequences, S cache length, D head dim.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import ops
from . import reference

# Bytes of gathered expert weights one chunk of the gathered formulation may allocate.
_GATHER_WORKSPACE_BYTES = 1 << 28
# Above this many (token, expert) pairs an uncaptured call (a prefill) takes the reference loop, which reads
# each expert once instead of once per pair.
_GATHER_MAX_PAIRS = 512


def moe_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """``reference.moe_experts`` without a host sync on CUDA (same signature and math, see the module doc).

    x: [T, H]; weights: [T, k] fp32; expert_ids: [T, k]; gate_up_proj: [E, 2I, H]; down_proj: [E, H, I].
    """
    if not x.is_cuda or x.dtype == gate_up_proj.dtype == down_proj.dtype == torch.bfloat16:
        return ops.moe_experts(x, weights, expert_ids, gate_up_proj, down_proj)  # bf16 CUDA: capturable kernels
    if expert_ids.numel() > _GATHER_MAX_PAIRS and not torch.cuda.is_current_stream_capturing():
        return reference.moe_experts(x, weights, expert_ids, gate_up_proj, down_proj)
    return moe_experts_gathered(x, weights, expert_ids, gate_up_proj, down_proj)


def moe_experts_gathered(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                         gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Routed experts by gathering each (token, expert) pair's weights and one batched matmul per projection.

    Reads k expert matrices per token, so it suits decode-sized T; tokens go in chunks whose gathered
    weights stay under ``_GATHER_WORKSPACE_BYTES`` (the chunking depends only on shapes: capturable).
    """
    T, H = x.shape
    k = expert_ids.shape[1]
    pair_bytes = (gate_up_proj[0].numel() + down_proj[0].numel()) * gate_up_proj.element_size()
    chunk = max(1, _GATHER_WORKSPACE_BYTES // (pair_bytes * k))
    outs = []
    for start in range(0, T, chunk):
        ids = expert_ids[start:start + chunk].reshape(-1).long()  # [t k]
        rows = x[start:start + chunk]
        xs = rows.unsqueeze(1).expand(-1, k, H).reshape(-1, H, 1)  # [t k, H, 1]
        gate, up = reference.split_gate_up(torch.bmm(gate_up_proj[ids], xs).squeeze(-1))  # [t k, I] each
        y = torch.bmm(down_proj[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [t k, H]
        outs.append(y.view(-1, k, H))
    return _combine(torch.cat(outs), weights, x.dtype)


def moe_block(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
              down_proj: torch.Tensor, shared_gate: torch.Tensor, shared_up: torch.Tensor,
              shared_down: torch.Tensor) -> torch.Tensor:
    """:func:`moe_experts` plus the shared expert down(silu(gate x) * up x), without a host sync. On CUDA with
    bf16 tensors one op, ``torch.ops.ringkern.moe_block_inference``: at decode sizes its few-rows kernels run
    the shared expert as one more expert and the combine adds it (contract: :func:`moe_block_inference_reference`).

    shared_gate, shared_up: [Is, H]; shared_down: [H, Is].
    """
    tensors = (x, gate_up_proj, down_proj, shared_gate, shared_up, shared_down)
    if x.is_cuda and all(t.dtype == torch.bfloat16 for t in tensors):
        return torch.ops.ringkern.moe_block_inference(x.contiguous(), weights.contiguous(), expert_ids,
                                                      gate_up_proj, down_proj, shared_gate, shared_up, shared_down)
    return moe_experts(x, weights, expert_ids, gate_up_proj, down_proj) + _shared_mlp(x, shared_gate, shared_up,
                                                                                        shared_down)


def moe_block_inference_reference(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                                  gate_up_proj: torch.Tensor, down_proj: torch.Tensor, shared_gate: torch.Tensor,
                                  shared_up: torch.Tensor, shared_down: torch.Tensor) -> torch.Tensor:
    """The contract of ``torch.ops.ringkern.moe_block_inference`` (its CPU kernel)."""
    return (reference.moe_experts(x, weights, expert_ids, gate_up_proj, down_proj)
            + _shared_mlp(x, shared_gate, shared_up, shared_down))


def _shared_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _combine(y_pairs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_j w_tj y_tj in fp32 (fixed order), cast to ``dtype``. y_pairs: [T, k, H]; weights: [T, k]."""
    acc = reference._acc(y_pairs) * reference._acc(weights).unsqueeze(-1)
    return acc.sum(1).to(dtype)


def sample_tokens_reference(logits: torch.Tensor, noise_keys: torch.Tensor, steps: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of ``torch.ops.ringkern.sample_tokens`` (its CPU kernel): one token per row, as
    ``ringkern.engine.sample`` draws it without filters. Returns (tokens [B] int64, fp32 log-probs [B]).

    logits: [B, V] bf16 or fp32 (computed in fp32); noise_keys, steps: [B] int64, keys in [0, 2**32).
    temperature 0: greedy (argmax, log-probs under the untempered distribution); otherwise the Gumbel-max draw
    of ``engine.gumbel_noise`` for (key, step) over logp = logits / temperature - logsumexp, and its logp.
    """
    from ..engine import gumbel_noise, hash32, logsumexp  # here: the engine imports the model, which imports us

    z = logits.float()
    if temperature == 0:
        tokens = z.argmax(-1)
        return tokens, z.gather(1, tokens.unsqueeze(1)).squeeze(1) - logsumexp(z)
    scaled = z / temperature
    logp = scaled - logsumexp(scaled).unsqueeze(-1)
    vocab_hash = hash32(torch.arange(z.shape[-1], dtype=torch.long, device=z.device))
    tokens = (logp + gumbel_noise(noise_keys, steps, vocab_hash)).argmax(-1)
    return tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1)


def cache_attention_mask(positions: torch.Tensor, cache_len: int, groups: int) -> torch.Tensor:
    """Mask of :func:`cached_attention`: [B, 1, G T, S] bool, True where key s <= positions[b, t].

    positions: [B, T]; row g T + t of a group is query head g of that group at query t.
    """
    B, T = positions.shape
    visible = torch.arange(cache_len, device=positions.device) <= positions.unsqueeze(-1)  # [B, T, S]
    return visible.unsqueeze(1).expand(B, groups, T, cache_len).reshape(B, 1, groups * T, cache_len)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     mask: torch.Tensor | None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new queries over cache rows that already hold their own keys and values.

    q: [B, Hq, T, D]; k_cache, v_cache: [B, Hkv, S, D]; mask: :func:`cache_attention_mask` of the
    queries' positions [B, T] (whatever the rows hold past a query's position is masked), or None to make it
    here from ``positions``. When ``decode_kernel_supported``, given ``positions``, the split-KV decode kernel
    of csrc/attention (``torch.ops.ringkern.decode_attention``, no mask needed); otherwise SDPA with the mask,
    the G = Hq/Hkv query heads of a group folded into the query axis so K and V are read once per group (no
    GQA expansion).
    """
    if positions is not None and decode_kernel_supported(q, k_cache):
        return torch.ops.ringkern.decode_attention(q.contiguous(), k_cache, v_cache, positions.contiguous())
    if mask is None:
        mask = cache_attention_mask(positions, k_cache.shape[2], q.shape[1] // k_cache.shape[1])
    return _masked_attention(q, k_cache, v_cache, mask)


def decode_kernel_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the decode step's attention of q [B, Hq, T, D] over k_cache [R, Hkv, S, D] takes the CUDA
    decode kernel (see :func:`decode_kernel_applies`)."""
    B, Hq, T, D = q.shape
    return decode_kernel_applies(q.device, q.dtype, k_cache.dtype, Hq // k_cache.shape[1], T, D)


def decode_kernel_applies(device: torch.device, q_dtype: torch.dtype, kv_dtype: torch.dtype, groups: int, T: int,
                          D: int) -> bool:
    """The decode kernel's domain: bf16 CUDA tensors, head dim 64/128/256 and G * T * D <= 2048 (G query heads
    per kv head), unless RINGKERN_DECODE_ATTENTION=0 (then SDPA). On the H200 at Ring-flash shapes (32 query
    heads, 4 kv heads, D=128, 1324 cached positions) one call took 8.2 / 18.3 / 45.5 us at batch 1 / 16 / 64
    against cuDNN SDPA's 38 / 41 / 75 us (benchmarks/RESULTS.md)."""
    return (os.environ.get("RINGKERN_DECODE_ATTENTION") != "0" and device.type == "cuda"
            and q_dtype == kv_dtype == torch.bfloat16 and D in (64, 128, 256) and groups * T * D <= 2048)


def _masked_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    q_grouped = q.reshape(B, Hkv, (Hq // Hkv) * T, D)  # query head h uses kv head h // G
    out = F.scaled_dot_product_attention(q_grouped, k_cache, v_cache, attn_mask=mask)  # [B, Hkv, G T, D]
    return out.reshape(B, Hq, T, D)


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, eps: float,
                  k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`reference.qkv_norm_rope` (with the optional cache write) as one kernel on CUDA:
    ``torch.ops.ringkern.qkv_norm_rope``, no autograd. The norm weights run in qkv's dtype."""
    if q_weight is not None:
        q_weight, k_weight = q_weight.to(qkv.dtype), k_weight.to(qkv.dtype)
    return torch.ops.ringkern.qkv_norm_rope(qkv.contiguous(), q_weight, k_weight, cos.contiguous(),
                                            sin.contiguous(), n_heads, n_kv, eps, k_cache, v_cache,
                                            None if positions is None else positions.contiguous())


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor) -> torch.Tensor:
    """The contract of ``torch.ops.ringkern.decode_attention`` (its CPU kernel): cache rows 0..B-1."""
    B, Hq, T, D = q.shape
    mask = cache_attention_mask(positions, k_cache.shape[2], Hq // k_cache.shape[1])
    return _masked_attention(q, k_cache[:B], v_cache[:B], mask)


__all__ = ["cache_attention_mask", "cached_attention", "decode_attention_reference", "decode_kernel_applies",
           "decode_kernel_supported", "moe_block", "moe_block_inference_reference", "moe_experts",
           "moe_experts_gathered", "qkv_norm_rope", "sample_tokens_reference"]
