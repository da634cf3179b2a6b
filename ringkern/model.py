"""RingFlashModel: the Ring-flash-2.0 / Ling 2.0 ("BailingMoeV2") architecture in PyTorch.

Module names follow the published checkpoints, so ``state_dict()`` keys are the published tensor names,
except the routed experts, which are stacked per layer for grouped GEMMs (``experts.gate_up_proj``
[E, 2I, H] with gate and up rows interleaved, ``experts.down_proj`` [E, H, I]); :mod:`ringkern.checkpoint`
maps them.

Inference keeps keys and values in a preallocated :class:`KVCache` passed to ``forward``; cached steps
use the sync-free routing and expert ops of :mod:`ringkern.ops.inference`, so a decode step can be
captured in a CUDA graph. Without a cache, ``forward`` is the training path. A cache allocated with
``mtp=True`` also holds the MTP layers, which then run cached too (``forward`` or, one depth at a time
with explicit next tokens, :meth:`RingFlashModel.mtp_forward`: the speculative draft model).

Shape legend: B batch, T tokens per sequence, N = B*T, H hidden, D head dim, V vocabulary,
E routed experts, k experts per token, I expert intermediate size, R cache rows, S cache positions.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import RingConfig
from .ops import inference as inference_ops

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Preallocated keys and values of every decoder layer: one row per sequence, one column per position.

    keys[i], values[i]: [R, Hkv, S, D] for layer i: the decoder layers, then (``mtp=True``) the MTP layers
    at their layer indices (num_hidden_layers + depth - 1). A row holds one sequence from position 0, so
    a decode step over rows 0..B-1 reads ``keys[i][:B]`` (a view, no gather) and masks positions beyond
    each query's own. Contiguous rows rather than pages: one engine serves fixed-size batches of
    sequences bounded by ``S``, and a row per sequence keeps the attention a plain SDPA call on a view
    that a CUDA graph captures as is; the price is memory for ``S`` positions per row whatever a
    sequence's length (paging would only pay off for many sequences of very different lengths).
    """
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, config: RingConfig, rows: int, max_seq_len: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, mtp: bool = False) -> "KVCache":
        """Zeroed cache of the decoder layers, plus the MTP layers with ``mtp``."""
        shape = (rows, config.num_key_value_heads, max_seq_len, config.head_dim)
        make = functools.partial(torch.zeros, shape, dtype=dtype, device=device)
        L = config.num_layers_with_mtp if mtp else config.num_hidden_layers
        return cls([make() for _ in range(L)], [make() for _ in range(L)])

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def row_view(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache of their own (views, no copy): a decode call on it, which addresses
        rows 0..B-1, reads and writes rows start..stop-1 of this cache."""
        return KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values])

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of row ``src`` into row ``dst`` in every layer."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]


@dataclass
class LayerKV:
    """One decoder layer's part of a :class:`KVCache` for one forward call.

    rows None (decode): the call's B sequences are cache rows 0..B-1 and continue at ``positions``;
    their new keys/values are written there and queries attend to the cached positions <= their own
    (``mask``, made once per forward for all layers). rows [B] (prefill): the call's tokens are the first
    T of each sequence (right padding allowed); they attend among themselves and their keys/values are
    written to positions [0, T) of ``rows``.
    """
    keys: torch.Tensor  # [R, Hkv, S, D]
    values: torch.Tensor  # [R, Hkv, S, D]
    positions: torch.Tensor  # [B, T]
    rows: torch.Tensor | None
    mask: torch.Tensor | None  # decode: [B, 1, G T, S] bool, see ops.inference.cache_attention_mask


class Attention(nn.Module):
    """Fused-QKV GQA with per-head q/k RMSNorm before partial NeoX RoPE."""

    def __init__(self, cfg: RingConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.use_qk_norm, self.eps = cfg.use_qk_norm, cfg.rms_norm_eps
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_padding_mask: torch.Tensor | None, kv: LayerKV | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x)  # [B, T, (Hq + 2 Hkv) D]
        norm_weights = (self.query_layernorm.weight, self.key_layernorm.weight) if self.use_qk_norm else (None, None)
        heads = (*norm_weights, cos, sin, self.n_heads, self.n_kv, self.eps)  # qkv_norm_rope's arguments
        if kv is None:  # training and uncached forwards: the differentiable composition
            q, k, v = ops.qkv_norm_rope(qkv, *heads)
            out = ops.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        elif kv.rows is None:  # decode: one kernel also writes k, v at their positions of cache rows 0..B-1
            q, _, _ = inference_ops.qkv_norm_rope(qkv, *heads, kv.keys, kv.values, kv.positions)
            out = inference_ops.cached_attention(q, kv.keys[:B], kv.values[:B], kv.mask, kv.positions)
        else:  # prefill: the sequences start at position 0 of their cache rows
            q, k, v = inference_ops.qkv_norm_rope(qkv, *heads)
            kv.keys[kv.rows, :, :T] = k
            kv.values[kv.rows, :, :T] = v
            out = ops.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)  # [B, Hq, T, D]
        return self.dense(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class DenseMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """fp32 sigmoid router; ``expert_bias`` is a buffer that only chooses experts and stays fp32."""

    def __init__(self, cfg: RingConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None):
        """x [N, H] -> (weights [N, k] fp32, expert_ids [N, k] int32, tokens_per_expert [E] int32).
        token_mask [N] bool: only those tokens count in tokens_per_expert (padding routes, but is not load).
        No host sync on CUDA (one fused kernel), so the cached decode step can be captured."""
        logits = ops.router_logits(x, self.weight)  # [N, E] fp32
        cfg = self.cfg
        weights, ids, counts = ops.moe_route(
            logits, self.expert_bias, n_group=cfg.n_group, topk_group=cfg.topk_group,
            top_k=cfg.num_experts_per_tok, routed_scaling_factor=cfg.routed_scaling_factor,
            renormalize=cfg.norm_topk_prob, expert_ids=expert_ids)
        if token_mask is not None:  # a scatter, not a boolean index: no host sync
            counted = token_mask.reshape(-1, 1).expand(ids.shape).reshape(-1).to(counts.dtype)
            counts = torch.zeros_like(counts).scatter_add_(0, ids.reshape(-1).long(), counted)
        return weights, ids, counts

    def _apply(self, fn, recurse=True):
        # Casting the model (to bf16, say) must not round the bias: move it, keep it fp32.
        bias = self._buffers.pop("expert_bias")
        super()._apply(fn, recurse)
        moved = fn(bias)
        if moved.dtype != torch.float32:
            moved = bias.to(device=moved.device, dtype=torch.float32)
        self._buffers["expert_bias"] = moved
        return self


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2I, H] (row 2i gate_i, row 2i + 1 up_i: see
    ``ops.reference.split_gate_up``), down_proj [E, H, I]."""

    def __init__(self, cfg: RingConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                sync_free: bool = False, shared: DenseMLP | None = None) -> torch.Tensor:
        """x [N, H] -> sum_k w_k expert_k(x) (+ shared(x)); with ``sync_free`` and a shared expert, one op
        (``ops.inference.moe_block``: at decode sizes the shared expert runs inside the routed kernels)."""
        if sync_free and shared is not None:
            return inference_ops.moe_block(x, weights, expert_ids, self.gate_up_proj, self.down_proj,
                                           shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
        experts = inference_ops.moe_experts if sync_free else ops.moe_experts
        y = experts(x, weights, expert_ids, self.gate_up_proj, self.down_proj)
        return y if shared is None else y + shared(x)


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [N, k] int32
    tokens_per_expert: torch.Tensor  # [E] int32


class MoEBlock(nn.Module):
    """y = sum_k w_k expert_k(x) + shared_expert(x). ``sync_free``: the capturable ops (cached inference)."""

    def __init__(self, cfg: RingConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        shared = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = DenseMLP(cfg.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None, sync_free: bool = False,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """x [B, T, H]; token_mask [B, T] bool: the tokens that count in the expert load (not padding)."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        replay = None if expert_ids is None else expert_ids.reshape(B * T, -1)
        if sync_free and self.shared_experts is not None:  # cached inference: the experts add the shared one
            weights, ids, counts = self.gate(flat, replay, token_mask)
            y = self.experts(flat, weights, ids, sync_free, shared=self.shared_experts)
            return y.view(B, T, H), Routing(ids.view(B, T, -1), counts)
        side = side_stream(flat) if self.shared_experts is not None else None
        if side is not None:  # the shared expert beside the router and the routed experts (fork)
            side.wait_stream(torch.cuda.current_stream(flat.device))
            with torch.cuda.stream(side):
                shared = self.shared_experts(flat)
        weights, ids, counts = self.gate(flat, replay, token_mask)
        y = self.experts(flat, weights, ids, sync_free)
        if side is not None:  # join
            torch.cuda.current_stream(flat.device).wait_stream(side)
            y = y + shared
        elif self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, H), Routing(ids.view(B, T, -1), counts)


SIDE_STREAM_MIN_TOKENS = 1024
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(x: torch.Tensor) -> torch.cuda.Stream | None:
    """The CUDA stream the shared expert runs on, concurrently with the routed path of the same layer, for
    x [N, H] with N >= SIDE_STREAM_MIN_TOKENS; None on the CPU and while torch.compile traces. Measured on
    an H200 at Ring-flash shapes (bf16 MoE block, benchmarks/bench_moe.py): N=16384 forward 7.96 ms vs 8.74
    sequential, forward+backward 29.6 vs 30.1; N=1 and N=64 slower eagerly (0.44 vs 0.36 ms, 1.80 vs 1.63).
    Safe for the caching allocator: every use forks from the current stream (so reused blocks are free)
    and joins it before the sum; autograd runs the shared expert's backward on this stream too."""
    if not x.is_cuda or x.shape[0] < SIDE_STREAM_MIN_TOKENS or torch.compiler.is_compiling():
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RingConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoEBlock(cfg) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, key_padding_mask, expert_ids=None, kv: LayerKV | None = None,
                load_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        """load_mask [B, T] bool: the tokens counted in the expert load (default: key_padding_mask)."""
        x = x + self.attention(self.input_layernorm(x), cos, sin, key_padding_mask, kv)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        # cached inference: no load statistics needed, and the decode step stays free of extra kernels
        counted = key_padding_mask if load_mask is None else load_mask
        y, routing = self.mlp(h, expert_ids, sync_free=kv is not None, token_mask=counted if kv is None else None)
        return x + y, routing


class MTPLayer(DecoderLayer):
    """Multi-token prediction: eh_proj(cat[enorm(emb(next ids)), hnorm(h)]) then a full MoE decoder block."""

    def __init__(self, cfg: RingConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, next_embeds, cos, sin, key_padding_mask, expert_ids=None, kv: LayerKV | None = None,
                load_mask: torch.Tensor | None = None):
        """h: previous depth's normed hidden [B, T, H]; returns (normed MTP hidden [B, T, H], routing)."""
        z = ops.mtp_input(next_embeds, h, self.enorm.weight, self.hnorm.weight, self.eh_proj.weight, self.enorm.eps)
        z, routing = super().forward(z, cos, sin, key_padding_mask, expert_ids, kv, load_mask)
        return self.final_layernorm(z), routing


class RingModel(nn.Module):
    def __init__(self, cfg: RingConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(L)] +
                                    [MTPLayer(cfg, L + d) for d in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class RingOutput:
    hidden_states: torch.Tensor  # [B, T, H] after model.norm: logits = lm_head(hidden_states)
    logits: torch.Tensor | None  # [B, T, V], None with compute_logits=False
    mtp_hidden_states: list[torch.Tensor] = field(default_factory=list)  # one [B, T, H] per MTP depth
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # one [B, T, V] per depth; depth d predicts t+1+d
    expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [B, T, k] int32
    tokens_per_expert: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [E] int32


class RingFlashModel(nn.Module):
    """Causal LM with optional MTP heads. ``forward`` returns a :class:`RingOutput`."""

    def __init__(self, config: RingConfig):
        super().__init__()
        self.config = config
        self.model = RingModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, float]] = {}
        self._rope_position_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, unit norms, zero expert biases (seed with torch.manual_seed)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.config.initializer_range)
        for name, b in self.named_buffers():
            if name.endswith("expert_bias"):
                b.zero_()

    # ------------------------------------------------------------------ layers
    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def routers(self) -> dict[int, Router]:
        return {i: layer.mlp.gate for i, layer in enumerate(self.model.layers) if layer.is_moe}

    # ----------------------------------------------------------------- forward
    def rope(self, position_ids: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [..., rot] for position_ids [...] (YaRN-scaled when rope_scaling says so). Given
        ``max_position`` (a bound on position_ids, e.g. a KV cache's length), rows of a table made once per device
        (the same numbers: one gather per call instead of five kernels in a decode step)."""
        if max_position is not None:
            table = self._rope_position_tables.get(position_ids.device)
            if table is None or table[0].shape[0] < max_position:
                table = self.rope(torch.arange(max_position, device=position_ids.device))
                self._rope_position_tables[position_ids.device] = table
            return F.embedding(position_ids, table[0]), F.embedding(position_ids, table[1])
        inv_freq, scale = self._rope_frequencies(position_ids.device)
        cos, sin = ops.rope_cos_sin(position_ids, inv_freq)
        return (cos * scale, sin * scale) if scale != 1.0 else (cos, sin)

    def _rope_frequencies(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """(inv_freq on ``device``, attention scale), made once per device: a decode step under CUDA-graph
        capture must not copy from the host."""
        if device not in self._rope_tables:
            cfg = self.config
            inv_freq, scale = ops.rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                                   cfg.max_position_embeddings)
            self._rope_tables[device] = (inv_freq.to(device), scale)
        return self._rope_tables[device]

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, expert_ids: dict[int, torch.Tensor] | None = None,
                compute_logits: bool = True, compute_mtp: bool = True, kv_cache: KVCache | None = None,
                cache_rows: torch.Tensor | None = None, load_mask: torch.Tensor | None = None) -> RingOutput:
        """input_ids [B, T]; attention_mask [B, T] bool/int (1 = real token), left or right padding;
        expert_ids: layer index -> [B, T, k] to replay routing instead of choosing; load_mask [B, T] bool:
        the tokens counted in tokens_per_expert (default: attention_mask's real tokens).

        kv_cache: read and write keys/values there (see :class:`LayerKV` for the two modes). With
        ``cache_rows`` [B] (prefill) the tokens start their sequences and go to those rows; without it
        (decode) the B sequences are rows 0..B-1 and ``position_ids`` [B, T] is required. The MTP layers
        run cached only with a cache allocated with ``mtp=True`` (else pass compute_mtp=False); as in
        training, depth d at the last d positions sees token 0 as its next token, so those positions'
        MTP keys/values are placeholders for a later call to overwrite (see :meth:`mtp_forward`).
        """
        B, T = input_ids.shape
        if kv_cache is not None and position_ids is None and cache_rows is None:
            raise ValueError("forward(kv_cache=...) without cache_rows (decode): position_ids [B, T] is required")
        if (kv_cache is not None and compute_mtp and self.mtp_layers
                and kv_cache.num_layers < self.config.num_layers_with_mtp):
            raise ValueError("forward(kv_cache=...): the cache has no MTP layers; allocate it with "
                             "KVCache.allocate(..., mtp=True) or pass compute_mtp=False")
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device).expand(B, T) if key_padding_mask is None
                            else (key_padding_mask.long().cumsum(-1) - 1).clamp_min(0))
        cos, sin = self.rope(position_ids, None if kv_cache is None else kv_cache.max_seq_len)
        replay = expert_ids or {}
        out = RingOutput(hidden_states=input_ids.new_empty(0), logits=None)
        decode_mask = self._decode_mask(position_ids, kv_cache, cache_rows)

        x = self.model.word_embeddings(input_ids)  # [B, T, H]
        for i, layer in enumerate(self.decoder_layers):
            kv = _layer_kv(kv_cache, i, position_ids, cache_rows, decode_mask)
            x, routing = layer(x, cos, sin, key_padding_mask, replay.get(i), kv, load_mask)
            self._record(out, i, routing)
        h = self.model.norm(x)
        out.hidden_states = h
        out.logits = self.lm_head(h) if compute_logits else None

        if compute_mtp:
            for depth, layer in enumerate(self.mtp_layers, start=1):
                idx = self.config.num_hidden_layers + depth - 1
                kv = _layer_kv(kv_cache, idx, position_ids, cache_rows, decode_mask)
                h, routing = layer(h, self.model.word_embeddings(shift_left(input_ids, depth)), cos, sin,
                                   key_padding_mask, replay.get(idx), kv, load_mask)
                self._record(out, idx, routing)
                out.mtp_hidden_states.append(h)
                if compute_logits:
                    out.mtp_logits.append(self.lm_head(h))
        return out

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, *,
                    position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    kv_cache: KVCache | None = None, cache_rows: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MTP depth ``depth`` (1-based) alone, with the next tokens given: the draft model's step.

        hidden [B, T, H]: ``hidden_states`` of the main model for depth 1, the previous depth's output
        after; next_ids [B, T]: the token ``depth`` positions after each position. Returns (this depth's
        normed hidden [B, T, H], whose lm_head logits predict the token depth+1 ahead; its expert ids
        [B, T, k] or None). Cache modes and arguments as in :meth:`forward` (the cache needs ``mtp=True``):
        position t's keys/values are exact once hidden[t] and next_ids[t] are, so a caller that rewrites
        every position whose inputs changed keeps the MTP cache equal to a full recompute.
        """
        if not 1 <= depth <= len(self.mtp_layers):
            raise ValueError(f"mtp_forward(depth={depth}): expected 1..{len(self.mtp_layers)} "
                             f"(num_nextn_predict_layers={self.config.num_nextn_predict_layers})")
        idx = self.config.num_hidden_layers + depth - 1
        if kv_cache is not None and kv_cache.num_layers <= idx:
            raise ValueError("mtp_forward(kv_cache=...): the cache has no MTP layers; allocate it with "
                             "KVCache.allocate(..., mtp=True)")
        if kv_cache is not None and position_ids is None and cache_rows is None:
            raise ValueError("mtp_forward(kv_cache=...) without cache_rows (decode): position_ids [B, T] is required")
        B, T = next_ids.shape
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(T, device=next_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids, None if kv_cache is None else kv_cache.max_seq_len)
        kv = _layer_kv(kv_cache, idx, position_ids, cache_rows, self._decode_mask(position_ids, kv_cache, cache_rows))
        h, routing = self.mtp_layers[depth - 1](hidden, self.model.word_embeddings(next_ids), cos, sin,
                                                key_padding_mask, None, kv)
        return h, None if routing is None else routing.expert_ids

    def _decode_mask(self, position_ids: torch.Tensor, kv_cache: KVCache | None,
                     cache_rows: torch.Tensor | None) -> torch.Tensor | None:
        """The cached-attention mask of a decode call (shared by its layers); None otherwise, and None when the
        decode kernel takes the attention (it needs no mask; ``cached_attention`` makes one if it does not)."""
        if kv_cache is None or cache_rows is not None:
            return None
        cfg = self.config
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        keys = kv_cache.keys[0]
        if inference_ops.decode_kernel_applies(keys.device, keys.dtype, keys.dtype, groups, position_ids.shape[1],
                                               cfg.head_dim):
            return None
        return inference_ops.cache_attention_mask(position_ids, kv_cache.max_seq_len, groups)

    @staticmethod
    def _record(out: RingOutput, layer_idx: int, routing: Routing | None) -> None:
        if routing is not None:
            out.expert_ids[layer_idx] = routing.expert_ids
            out.tokens_per_expert[layer_idx] = routing.tokens_per_expert

    # -------------------------------------------------------------------- loss
    def sft_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token CE on ``labels`` (aligned with input_ids, -100 = no loss) plus
        mtp_loss_scaling_factor x the CE of each MTP depth d on token t+1+d. Never builds [N, V] logits
        outside the loss op."""
        out = self.forward(input_ids, attention_mask=attention_mask, compute_logits=False)
        parts = {"lm_loss": self._shifted_ce(out.hidden_states, labels, 1)}
        loss = parts["lm_loss"]
        for depth, h in enumerate(out.mtp_hidden_states, start=1):
            parts[f"mtp_loss_{depth}"] = self._shifted_ce(h, labels, 1 + depth)
            loss = loss + self.config.mtp_loss_scaling_factor * parts[f"mtp_loss_{depth}"]
        parts["tokens_per_expert"] = out.tokens_per_expert
        return loss, parts

    def _shifted_ce(self, hidden: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
        targets = shift_left(labels, shift, fill=IGNORE_INDEX)  # position t predicts labels[t + shift]
        return ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                        targets.reshape(-1), ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "RingFlashModel":
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, model_cls=cls)

    def save_pretrained(self, path, **kwargs) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)


def _layer_kv(kv_cache: KVCache | None, layer_idx: int, position_ids: torch.Tensor, cache_rows: torch.Tensor | None,
              decode_mask: torch.Tensor | None) -> LayerKV | None:
    if kv_cache is None:
        return None
    return LayerKV(kv_cache.keys[layer_idx], kv_cache.values[layer_idx], position_ids, cache_rows, decode_mask)


def shift_left(t: torch.Tensor, n: int, fill: int = 0) -> torch.Tensor:
    """t[:, i + n] at position i; the last n positions get ``fill``. t: [B, T]."""
    out = torch.full_like(t, fill)
    if n < t.shape[1]:
        out[:, : t.shape[1] - n] = t[:, n:]
    return out


@torch.no_grad()
def update_expert_biases(model: RingFlashModel, tokens_per_expert: dict[int, torch.Tensor],
                         rate: float = 1e-3) -> dict[str, float]:
    """Aux-loss-free balancing after an optimizer step; returns load metrics over the MoE layers.

    tokens_per_expert: layer index -> [E] counts summed over the step (RingOutput.tokens_per_expert).
    Metrics: max_load_ratio (busiest expert over the mean, worst layer), mean_max_violation
    ((max - mean) / mean averaged over layers), dead_expert_frac (experts that got no token).
    """
    routers = model.routers()
    ratios, dead = [], []
    for idx, counts in tokens_per_expert.items():
        load = counts.float()
        ops.expert_bias_update(routers[idx].expert_bias, load, rate)
        mean = load.mean().clamp_min(1e-9)
        ratios.append((load.max() / mean).item())
        dead.append((load == 0).float().mean().item())
    if not ratios:
        return {}
    return {"max_load_ratio": max(ratios), "mean_max_violation": sum(r - 1 for r in ratios) / len(ratios),
            "dead_expert_frac": sum(dead) / len(dead)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["KVCache", "LayerKV", "RingFlashModel", "RingOutput", "update_expert_biases", "count_parameters",
           "shift_left", "IGNORE_INDEX"]
