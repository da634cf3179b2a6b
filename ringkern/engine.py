"""Engine: batched generation with a KV cache, continuous batching and CUDA graphs; the RL rollout engine.

``Engine(model).generate(prompts, SamplingParams(...))`` returns one :class:`Completion` per sample, in
prompt-major order; ``Engine.stream`` yields ``(completion_index, token_id, logprob)`` as tokens come.

How a call runs:

- Every sequence owns one row of a preallocated :class:`ringkern.model.KVCache` (see its docstring for
  why contiguous rows). The active sequences always occupy rows 0..n-1, so a decode step runs on a
  view of the first rows; when one finishes, the last active sequence moves into its row.
- Prefill: waiting prompts join as soon as rows are free (continuous batching: the running sequences
  keep decoding, nothing drains). Joining prompts are right-padded into one batch; a prompt with n
  samples is prefilled once and its keys/values copied to the other n-1 rows.
- Decode: one token per active sequence per step. On CUDA the step (model and lm_head, fp32 logits)
  is captured once per batch size bucket (1, 2, 4, ... max_batch; a step with n active sequences runs
  the smallest bucket >= n, the spare rows compute on a dummy token) into a CUDA graph replayed with
  static input buffers. The step has no host syncs: the QKV kernel writes the cache, attention is the
  split-KV decode kernel (SDPA with a position mask where it does not apply), and the MoE layers use the
  sync-free ops of :mod:`ringkern.ops.inference`.
- The decode step's sampling is part of that graph (one graph per batch bucket and set of sampling
  filters: the sampler branches on them on the host, no sort at all for plain temperature sampling, and
  greedy or plain temperature draws are one fused op, ``torch.ops.ringkern.sample_tokens``).
  Each step's inputs (last token, position, noise key and generated count per row) go to the device in
  one copy, and its tokens and log-probs come back in one copy, the step's only host sync (stop checks
  and streaming need them). At batch 1 the host's work between two steps is on the critical path, so
  it is kept to that.

Speculative decoding (``speculative_tokens=d``): the model's MTP layers draft d tokens per sequence and
the main model verifies them in one forward over a window of d+1 new positions per row (plus D-1
positions it already holds, D = min(d, num_nextn_predict_layers), which the chained MTP depths need);
every accepted draft and one more token commit per step. Drafts 1..D come from MTP depths 1..D chained
at the last committed position (depth j reads draft j-1 as its next token); drafts beyond D reuse the
last MTP layer one position further each time, its own output standing in for the previous depth's
hidden state there. After a prefill the MTP layers run over the new prompts (filling their cache) and
draft the first step. The cache holds the MTP layers too. After a step with c committed tokens, the
main model's keys/values are exact up to position c-2 and MTP depth j's up to c-1-j (whose next
token is committed); every position past those is rewritten by the next window before any query reads
it, and positions beyond a query's own are masked, so rejected drafts never leak. Greedy: a draft is
accepted when it is the main model's argmax, so the tokens equal plain greedy decoding. Sampling: the
standard rejection rule (accept draft x with probability min(1, p(x)/q(x)), p and q the main model's
and the draft's filtered distributions; on rejection draw from normalize(max(p - q, 0)); after d
accepts draw a bonus token from p), so the output distribution is plain sampling's. On CUDA the whole
step (verify forward, acceptance rule, MTP drafting and draft draws) has no host sync and is captured as
one CUDA graph per batch bucket and set of sampling filters, as plain decoding's step is. One host sync
per step reads the committed tokens back.

Sampling: logits / temperature, then top-k, then top-p (nucleus, over the top-k survivors), then min-p
(drop tokens below min_p times the top probability), then a Gumbel-max draw. The Gumbel noise of the
token drawn at generated index g of completion c is a fixed hash of (seed, c, g, vocabulary index), so a
seeded call is reproducible and each sample is independent of how it was batched. ``logprobs`` are
the fp32 log-probabilities of the drawn tokens under that filtered distribution (temperature 0: greedy,
log-probabilities under the untempered distribution): pi_infer for IcePop. Speculative decoding keeps
that contract (the log-probs are the main model's, under the distribution the committed token follows)
and draws its own randomness from the same hash: draft tokens, acceptance uniforms and residual draws
use the completion's key xor a fixed salt at the generated index they decide; a bonus token uses the
plain key, so it is the token plain sampling would draw there.
"""
from __future__ import annotations

import functools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model import KVCache, RingFlashModel

FINISH_STOP, FINISH_LENGTH = "stop", "length"
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: products of a 32-bit value with them stay inside int64.
_MIX_A, _MIX_B = 0x2C1B3C6D, 0x297A2D39
# Prompt tokens of one prefill call (the joining prompts are split into calls under this budget).
_PREFILL_TOKENS = 8192
# Noise-key salts of speculative decoding's random draws (see the module docstring).
_DRAFT_SALT, _ACCEPT_SALT, _RESIDUAL_SALT = 0x5BD1E995, 0x68E31DA4, 0x1B873593


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 = greedy. top_k 0 and top_p 1 and min_p 0 disable those filters.

    Generation stops at any of ``stop_token_ids`` (and the model's eos unless ``ignore_eos``) or when the
    completion's text contains one of ``stop_strings`` (needs the Engine's tokenizer); the stopping token
    is kept in the completion. ``n`` samples per prompt share one prefill. ``seed`` None draws one from
    torch's global generator. ``return_expert_ids``: see :class:`Completion`.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    max_new_tokens: int = 256
    n: int = 1
    return_expert_ids: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {expected}")

        need(self.temperature >= 0, "temperature", ">= 0 (0 = greedy)")
        need(self.top_k >= 0, "top_k", ">= 0 (0 = off)")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(0 <= self.min_p < 1, "min_p", "in [0, 1)")
        need(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        need(self.n >= 1, "n", ">= 1")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings", "non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sample. ``token_ids`` and ``logprobs`` (fp32 values, one per token) include a stopping token.

    expert_ids (with ``return_expert_ids``): MoE layer index -> int32 [len(prompt) + len(token_ids) - 1, k],
    the routed experts of every position of prompt + completion except the last generated token's (the
    engine never feeds that token, and no generated token's log-prob depends on it). For a training
    forward over all of prompt + completion, :meth:`replay_expert_ids` gives one row per position.
    """
    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    expert_ids: dict[int, torch.Tensor] | None = None

    def replay_expert_ids(self) -> dict[int, torch.Tensor]:
        """MoE layer -> int32 [len(prompt) + len(token_ids), k]: ``expert_ids`` with its last row repeated
        for the final token, whose routing changes no log-prob of the completion (MoE is per token)."""
        if self.expert_ids is None:
            raise ValueError("Completion.replay_expert_ids: generate with SamplingParams(return_expert_ids=True)")
        return {layer: torch.cat([ids, ids[-1:]]) for layer, ids in self.expert_ids.items()}


@dataclass
class EngineStats:
    """Counters of the last ``generate``/``stream`` call. Times are host wall-clock and include sampling
    and the one host sync per step, so they are complete (no GPU work left in flight).

    ``decode_rows`` sums the active sequences over the decode steps. With speculative decoding a decode
    step is one verify step (plus the drafting for the next); ``drafted_tokens`` counts the drafts
    verified (d per row and step), ``accepted_tokens`` those the verifier accepted (before any stop cut
    the step short)."""
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (NaN without drafts)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Tokens committed per sequence and decode (verify) step: 1 without speculation (NaN without steps)."""
        return self.decode_tokens / self.decode_rows if self.decode_rows else float("nan")


Event = tuple[int, int, float]  # (completion_index, token_id, logprob)


@dataclass
class _Sequence:
    """A completion being generated; ``routing`` holds [L_moe, t, k] CPU chunks when expert ids are kept."""
    index: int
    prompt: list[int]
    noise_key: int
    completion: Completion
    routing: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion.token_ids)


class Engine:
    """Generation over a :class:`RingFlashModel` (see the module docstring).

    max_batch: cache rows (sequences decoded together); max_seq_len: positions per row (prompt plus
    completion). device: defaults to the model's; the model is moved there. tokenizer: a
    :class:`ringkern.tokenizer.RingTokenizer`, needed for stop strings. cuda_graphs: capture decode steps
    on CUDA (False: eager, e.g. to compare). speculative_tokens: drafts per step from the model's MTP
    layers (0 = plain decoding; any d >= 1 works with at least one MTP layer, see the module docstring).
    """

    def __init__(self, model: RingFlashModel, *, max_batch: int = 8, max_seq_len: int = 2048, device=None,
                 speculative_tokens: int = 0, tokenizer=None, cuda_graphs: bool = True):
        if not isinstance(speculative_tokens, int) or speculative_tokens < 0:
            raise ValueError(f"speculative_tokens={speculative_tokens!r}: expected an int >= 0 (0 = no speculation)")
        if speculative_tokens and not model.config.num_nextn_predict_layers:
            raise ValueError(f"speculative_tokens={speculative_tokens}: the model has no MTP layers to draft with "
                             "(num_nextn_predict_layers=0); expected 0")
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch={max_batch}, max_seq_len={max_seq_len}: expected >= 1 and >= 2")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.dtype = model.lm_head.weight.dtype
        self.speculative_tokens = speculative_tokens
        self.draft_depths = min(speculative_tokens, self.config.num_nextn_predict_layers)  # D chained MTP depths
        # A live sequence's verify window and drafts reach up to 2d positions past its last one.
        self.cache = KVCache.allocate(self.config, max_batch, max_seq_len + 2 * speculative_tokens, dtype=self.dtype,
                                      device=self.device, mtp=speculative_tokens > 0)
        self.moe_layers = [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.batch_buckets = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        window = self.draft_depths + speculative_tokens if speculative_tokens else 1
        self._tokens = torch.zeros(max_batch, window, dtype=torch.long, device=self.device)  # static step inputs
        self._positions = torch.zeros(max_batch, window, dtype=torch.long, device=self.device)
        self._drafts = torch.zeros(max_batch, speculative_tokens, dtype=torch.long, device=self.device)  # per row
        self._draft_logq = torch.zeros(max_batch, speculative_tokens, self.config.vocab_size if speculative_tokens
                                       else 0, device=self.device)  # the drafts' filtered log-distributions
        # The speculative step's static input, written by one host-to-device copy per step [R, W + 4]: each row's
        # window tokens (zeros where its drafts go), then its first position, the number of committed tokens in
        # the window, its noise key and its generated count (see _window_inputs / _unpack_window).
        self._window_in = torch.zeros(max_batch, window + 4, dtype=torch.long, device=self.device)
        # The plain decode step's static input [R, 4]: each row's last token, its position, noise key and
        # generated count (see _decode / _decode_forward).
        self._decode_in = torch.zeros(max_batch, 4, dtype=torch.long, device=self.device)
        self._decode_fed: tuple | None = None  # (sequence indices, bucket) whose next inputs _decode_in holds
        self._arange = torch.arange(max(max_batch, window + 1), device=self.device)  # static index vectors
        # Its buffers for the MTP depths: the window's tokens with the committed token and the drafts after it
        # [R, W + D], the draft position's window index [R], and the hidden states that feed depth j (entry
        # j-1: the main model's for depth 1, then depth j-1's) [R, W, H].
        self._ext = torch.zeros(max_batch, window + self.draft_depths, dtype=torch.long, device=self.device)
        self._anchor = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._depth_inputs = [torch.zeros(max_batch, window, self.config.hidden_size, dtype=self.dtype,
                                          device=self.device) for _ in range(self.draft_depths + 1)]
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._vocab_hash: torch.Tensor | None = None
        self.stats = EngineStats()

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One Completion per (prompt, sample), prompt-major: prompt 0's n samples first."""
        sequences = self._sequences(prompts, params)
        for _ in self._run(sequences, prompts, params):
            pass
        return [s.completion for s in sequences]

    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[Event]:
        """Yield (completion_index, token_id, logprob) per generated token; indices as in ``generate``."""
        yield from self._run(self._sequences(prompts, params), prompts, params)

    # ---------------------------------------------------------------- scheduling
    def _sequences(self, prompts: list[list[int]], params: SamplingParams) -> list[_Sequence]:
        self._validate(prompts, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        out = []
        for p, prompt in enumerate(prompts):
            for j in range(params.n):
                index = len(out)
                out.append(_Sequence(index, list(prompt), _noise_key(seed, index), Completion(p, j)))
        return out

    def _validate(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if params.n > self.max_batch:
            raise ValueError(f"SamplingParams.n={params.n}: expected <= max_batch ({self.max_batch})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop_strings needs Engine(..., tokenizer=...)")
        vocab = self.config.vocab_size
        for i, prompt in enumerate(prompts):
            if not 1 <= len(prompt) < self.max_seq_len:
                raise ValueError(f"prompts[{i}]: length {len(prompt)}, expected 1..{self.max_seq_len - 1} "
                                 f"(max_seq_len={self.max_seq_len})")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompts[{i}]: token ids must lie in [0, {vocab})")

    def _run(self, sequences: list[_Sequence], prompts: list[list[int]], params: SamplingParams) -> Iterator[Event]:
        n = params.n
        self.stats = stats = EngineStats()
        self._decode_fed = None
        waiting = deque(range(len(prompts)))
        active: list[_Sequence] = []  # active[r] lives in cache row r
        while waiting or active:
            joining = []
            while waiting and len(active) + n * (len(joining) + 1) <= self.max_batch:
                joining.append(waiting.popleft())
            for group in _prefill_groups(joining, prompts):
                start = time.perf_counter()
                events = self._prefill([s for p in group for s in sequences[p * n:(p + 1) * n]], active, params)
                stats.prefill_seconds += time.perf_counter() - start
                stats.prefill_tokens += sum(len(prompts[p]) for p in group)
                self._retire(active)
                yield from events
            if active:
                start = time.perf_counter()
                events = self._speculate(active, params) if self.speculative_tokens else self._decode(active, params)
                stats.decode_seconds += time.perf_counter() - start
                stats.decode_steps += 1
                stats.decode_rows += len(active)
                stats.decode_tokens += len(events)
                self._retire(active)
                yield from events

    def _retire(self, active: list[_Sequence]) -> None:
        """Drop finished sequences, moving the last active ones into their rows (rows stay 0..n-1)."""
        for row in reversed(range(len(active))):
            if active[row].completion.finish_reason is None:
                continue
            last = active.pop()
            if row < len(active):
                self.cache.copy_row(len(active), row, last.length)
                self._drafts[row] = self._drafts[len(active)]
                self._draft_logq[row] = self._draft_logq[len(active)]
                active[row] = last

    # ----------------------------------------------------------------- prefill
    @torch.no_grad()
    def _prefill(self, new: list[_Sequence], active: list[_Sequence], params: SamplingParams) -> list[Event]:
        """Prefill the prompts of ``new`` (n consecutive samples per prompt) into rows after ``active``."""
        n = params.n
        heads = new[::n]
        first_row = len(active)
        lengths = torch.tensor([len(s.prompt) for s in heads])
        ids = torch.zeros(len(heads), int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(heads):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
        rows = torch.arange(first_row, first_row + n * len(heads), n, device=self.device)
        out = self.model(ids.to(self.device), kv_cache=self.cache, cache_rows=rows, compute_logits=False,
                         compute_mtp=False)
        last = out.hidden_states[torch.arange(len(heads), device=self.device), lengths.to(self.device) - 1]  # [P, H]
        logits = self.model.lm_head(last).float().repeat_interleave(n, dim=0)  # [P n, V]
        for i, s in enumerate(heads):
            for j in range(1, n):
                self.cache.copy_row(first_row + i * n, first_row + i * n + j, len(s.prompt))
        if params.return_expert_ids and self.moe_layers:
            routing = torch.stack([out.expert_ids[i] for i in self.moe_layers], dim=1).cpu()  # [P, L_moe, T, k]
            for i, s in enumerate(new):
                s.routing.append(routing[i // n, :, : len(s.prompt)])
        active.extend(new)
        events = self._sample(new, logits, params)
        if self.speculative_tokens:
            self._draft_after_prefill(new, first_row, out.hidden_states.repeat_interleave(n, dim=0), params)
        return events

    def _draft_after_prefill(self, new: list[_Sequence], first_row: int, hidden: torch.Tensor,
                             params: SamplingParams) -> None:
        """Fill the MTP layers' cache over the new prompts and draft their first step (rows from first_row).

        hidden [b, T, H]: the prefill's main hidden states, one row per new sequence.
        """
        b, T, _ = hidden.shape
        D = self.draft_depths
        ext = torch.zeros(b, T + D, dtype=torch.long)
        mask = torch.zeros(b, T, dtype=torch.bool)
        for i, s in enumerate(new):
            ext[i, : len(s.prompt) + 1] = torch.tensor(s.prompt + s.completion.token_ids[:1])
            mask[i, : len(s.prompt)] = True
        ext, mask = ext.to(self.device), mask.to(self.device)
        anchor = torch.tensor([len(s.prompt) - 1 for s in new], device=self.device)
        rows = torch.arange(first_row, first_row + b, device=self.device)
        depth_input = hidden

        def run_depth(depth: int) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal depth_input
            depth_input, _ = self.model.mtp_forward(depth, depth_input, ext[:, depth: depth + T], attention_mask=mask,
                                                    kv_cache=self.cache, cache_rows=rows)
            at_draft = depth_input[torch.arange(b, device=self.device), anchor]
            return self.model.lm_head(at_draft).float(), at_draft

        keys, steps = self._noise_inputs(new, b)
        drafts, logq, last_hidden = self._draft_depths(run_depth, ext, anchor, keys, steps, params)
        self._draft_beyond_depths(drafts, logq, last_hidden, anchor, keys, steps, params,
                                  self.cache.row_view(first_row, first_row + b))
        self._drafts[rows] = torch.stack(drafts, dim=1)
        if not params.greedy:
            self._draft_logq[rows] = torch.stack(logq, dim=1)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def _decode(self, active: list[_Sequence], params: SamplingParams) -> list[Event]:
        """One decode step of every active sequence (rows 0..len(active)-1)."""
        count = len(active)
        # On CUDA eager steps use the buckets too, so they run exactly the kernels a graph replays.
        batch = next(b for b in self.batch_buckets if b >= count) if self.device.type == "cuda" else count
        fed = (tuple(s.index for s in active), batch)
        if self._decode_fed != fed:  # else the last step already wrote this step's inputs on the device
            rows = [[s.completion.token_ids[-1], s.length - 1, s.noise_key, len(s.completion.token_ids)] for s in active]
            rows += [[0, 0, 0, 0]] * (batch - count)  # spare rows: token 0 from position 0
            self._decode_in[:batch].copy_(torch.tensor(rows))
        filters = (params.temperature, params.top_k, params.top_p, params.min_p)
        sampled, routing = self._step(f"decode{filters}", functools.partial(self._decode_forward, params), batch)
        if params.return_expert_ids and self.moe_layers:
            routing = routing[:, :count].cpu()  # [L_moe, count, k]
            for row, s in enumerate(active):
                s.routing.append(routing[:, row: row + 1])
        events = self._emit(active, sampled[:count].tolist(), params)
        self._decode_fed = fed
        return events

    def _decode_forward(self, params: SamplingParams, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step and its sampling on the static inputs ``_decode_in`` of rows 0..batch-1, without a
        host sync: (tokens and their log-probs packed for one device-to-host copy [b, 2] fp64, expert ids
        [L_moe, b, k])."""
        last, position, keys, steps = self._decode_in[:batch].unbind(1)
        self._tokens[:batch, 0] = last
        self._positions[:batch, 0] = position
        out = self.model(self._tokens[:batch], position_ids=self._positions[:batch], kv_cache=self.cache,
                         compute_logits=False, compute_mtp=False)
        logits = self.model.lm_head(out.hidden_states[:, -1])
        tokens, logprobs = sample(logits, params, keys, steps, self._noise_basis(logits.shape[-1]))
        # The next step's inputs if the same rows decode again (see _decode): each row's new token, one
        # position and one generated token further (spare rows move along from position 0, harmlessly).
        self._decode_in[:batch, 0] = tokens
        self._decode_in[:batch, 1::2] += 1
        k = self.config.num_experts_per_tok
        routing = (torch.stack([out.expert_ids[i][:, -1] for i in self.moe_layers]) if self.moe_layers
                   else torch.zeros(0, batch, k, dtype=torch.int32, device=self.device))
        return torch.stack([tokens.double(), logprobs.double()], dim=1), routing

    def _step(self, name: str, forward, batch: int) -> tuple[torch.Tensor, ...]:
        """``forward(batch)`` on the static inputs: replayed from a CUDA graph captured once per (step name,
        batch bucket) when graphs are on, else run eagerly."""
        if not self.use_graphs:
            return forward(batch)
        key = (name, batch)
        if key not in self._graphs:
            self._graphs[key] = self._capture(forward, batch)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs

    def _capture(self, forward, batch: int):
        """Capture ``forward`` for ``batch`` rows. The static inputs already hold this step's tokens,
        so the warm-up runs write exactly the keys/values the replay writes again."""
        inputs = self._decode_in.clone()  # the decode step advances its inputs: each run starts from these
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_in.copy_(inputs)
                forward(batch)
            self._decode_in.copy_(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outputs = forward(batch)
        return graph, outputs

    # --------------------------------------------------------- speculative decoding
    @torch.no_grad()
    def _speculate(self, active: list[_Sequence], params: SamplingParams) -> list[Event]:
        """One speculative step of every active sequence: verify its drafts, draft the next step, commit."""
        count = len(active)
        batch = next(b for b in self.batch_buckets if b >= count) if self.device.type == "cuda" else count
        offsets = self._window_inputs(active, batch)
        filters = (params.temperature, params.top_k, params.top_p, params.min_p)
        committed, drafts, logq, routing = self._step(
            f"speculate{filters}", functools.partial(self._speculative_forward, params), batch)
        self._drafts[:batch] = drafts
        if logq is not None:
            self._draft_logq[:batch] = logq
        return self._commit_window(active, committed, offsets, routing, params)

    def _speculative_forward(self, params: SamplingParams, batch: int) -> tuple[torch.Tensor, ...]:
        """Verify, accept and draft on the static inputs of rows 0..batch-1, without a host sync (one CUDA
        graph per batch bucket and set of sampling filters). Reads the drafts from the static inputs and
        returns the next ones rather than overwriting them, so a run is repeatable (capture warm-up).

        Returns (fp64 [b, 2k+3]: tokens [k+1], log-probs [k+1] and accepted, see :func:`verify_drafts`, packed
        for one device-to-host copy; the next drafts [b, k] and, when sampling, their log-distributions
        [b, k, V] (None when greedy: unused); expert ids [L_moe, b, W, k]).
        """
        k = self.speculative_tokens
        offsets, keys, steps = self._unpack_window(batch)
        logits, routing = self._verify_forward(batch)  # [b, W, V] fp32, [L_moe, b, W, k]
        rows = self._arange[:batch]
        predicting = (offsets - 1).unsqueeze(1) + self._arange[:k + 1]  # [b, k+1] window index
        drafted = self._tokens[:batch].gather(1, predicting[:, 1:])  # the drafts under verification [b, k]
        tokens, logprobs, accepted = verify_drafts(
            logits.gather(1, predicting.unsqueeze(-1).expand(-1, -1, logits.shape[-1])), drafted,
            self._draft_logq[:batch], params, keys, steps, self._noise_basis(logits.shape[-1]))
        ext, anchor = self._ext[:batch], self._anchor[:batch]
        ext[:, : self._tokens.shape[1]] = self._tokens[:batch]
        ext[rows, offsets + accepted] = tokens[rows, accepted]  # the committed correction / bonus token
        anchor.copy_(offsets + accepted - 1)  # window index of the draft position: the second-to-last committed one
        drafts, logq, last_hidden = self._draft_depths(functools.partial(self._depth_forward, batch=batch),
                                                       ext, anchor, keys, steps + accepted + 1, params)
        self._draft_beyond_depths(drafts, logq, last_hidden, self._positions[rows, anchor], keys,
                                  steps + accepted + 1, params, self.cache)
        committed = torch.cat([tokens.double(), logprobs.double(), accepted.double().unsqueeze(1)], dim=1)
        return committed, torch.stack(drafts, dim=1), None if params.greedy else torch.stack(logq, dim=1), routing

    def _window_inputs(self, active: list[_Sequence], batch: int) -> list[int]:
        """Write each row's verify window, committed-token count and noise inputs into the static input
        ``_window_in`` (one host-to-device copy); returns the committed-token counts.

        A row's window covers positions [c - D, c + d) for c committed tokens: its last D committed tokens
        (fewer at the very start), then its d drafts (scattered in on the device), then padding. Spare rows
        hold token 0 from position 0.
        """
        D, W = self.draft_depths, self._tokens.shape[1]
        rows = []
        for s in active:
            tail = _last_tokens(s, min(D, s.length))
            rows.append(tail + [0] * (W - len(tail))
                        + [s.length - len(tail), len(tail), s.noise_key, len(s.completion.token_ids)])
        rows += [[0] * W + [0, 1, 0, 0]] * (batch - len(active))
        self._window_in[:batch].copy_(torch.tensor(rows))
        return [r[W + 1] for r in rows]

    def _unpack_window(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In the step (captured): the window tokens with the drafts after the committed ones and the positions
        into the static inputs; returns (committed tokens in the window, noise keys, generated counts) [b]."""
        k, W = self.speculative_tokens, self._tokens.shape[1]
        window = self._window_in[:batch]
        start, offsets, keys, steps = window[:, W:].unbind(1)
        tokens = self._tokens[:batch]
        tokens.copy_(window[:, :W])
        tokens.scatter_(1, offsets.unsqueeze(1) + self._arange[:k], self._drafts[:batch])
        torch.add(start.unsqueeze(1), self._arange[:W], out=self._positions[:batch])
        return offsets, keys, steps

    def _verify_forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model over the static windows of rows 0..batch-1: (logits [b, W, V] fp32, expert ids
        [L_moe, b, W, k]); the hidden states go to the static input of MTP depth 1."""
        out = self.model(self._tokens[:batch], position_ids=self._positions[:batch], kv_cache=self.cache,
                         compute_logits=False, compute_mtp=False)
        self._depth_inputs[0][:batch] = out.hidden_states
        logits = self.model.lm_head(out.hidden_states).float()
        k, width = self.config.num_experts_per_tok, self._tokens.shape[1]
        routing = (torch.stack([out.expert_ids[i] for i in self.moe_layers]) if self.moe_layers
                   else torch.zeros(0, batch, width, k, dtype=torch.int32, device=self.device))
        return logits, routing

    def _depth_forward(self, depth: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth ``depth`` over the static windows of rows 0..batch-1 (decode mode) with the static next
        tokens and draft positions: (head logits at the draft position [b, V] fp32, the hidden there [b, H]);
        its hidden states feed the next depth."""
        width = self._tokens.shape[1]
        h, _ = self.model.mtp_forward(depth, self._depth_inputs[depth - 1][:batch],
                                      self._ext[:batch, depth: depth + width], position_ids=self._positions[:batch],
                                      kv_cache=self.cache)
        self._depth_inputs[depth][:batch] = h
        at_draft = h[self._arange[:batch], self._anchor[:batch]]
        return self.model.lm_head(at_draft).float(), at_draft

    def _draft_depths(self, run_depth, ext: torch.Tensor, anchor: torch.Tensor, keys: torch.Tensor,
                      steps: torch.Tensor, params: SamplingParams
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Drafts 1..D, one per MTP depth at the draft position, each fed to the next depth.

        run_depth(j): runs depth j over the window, returns (head logits [b, V] fp32, hidden [b, H]) at the
        draft position; ext [b, W + D]: the window's tokens that it reads, the last committed one at
        anchor + 1 (drafts are written after it); anchor [b]: window index of the draft position; steps [b]:
        generated index of draft 1. Returns (D drafts [b], their filtered log-distributions [b, V] (None when
        greedy), depth D's hidden at the draft position [b, 1, H]).
        """
        rows = self._arange[:ext.shape[0]]
        drafts, logq = [], []
        for depth in range(1, self.draft_depths + 1):
            logits, hidden = run_depth(depth)
            token, token_logq = self._draw_draft(logits, keys, steps + depth - 1, params)
            if depth < self.draft_depths:  # the next depth's next token at the draft position
                ext[rows, anchor + 1 + depth] = token
            drafts.append(token)
            logq.append(token_logq)
        return drafts, logq, hidden.unsqueeze(1)

    def _draft_beyond_depths(self, drafts: list[torch.Tensor], logq: list[torch.Tensor], h: torch.Tensor,
                             position: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor,
                             params: SamplingParams, cache: KVCache) -> None:
        """Append drafts D+1..d to ``drafts``/``logq``: the last MTP layer one position further each time
        (decode mode on rows 0..b-1 of ``cache``), fed its own output h [b, 1, H] at the previous position as
        the hidden state and the previous draft as the next token. position [b]: the draft position. Its
        keys/values there are stand-ins that the next verify window rewrites."""
        for i in range(self.draft_depths, self.speculative_tokens):
            position = position + 1
            h, _ = self.model.mtp_forward(self.draft_depths, h, drafts[-1].unsqueeze(1),
                                          position_ids=position.unsqueeze(1), kv_cache=cache)
            token, token_logq = self._draw_draft(self.model.lm_head(h[:, 0]).float(), keys, steps + i, params)
            drafts.append(token)
            logq.append(token_logq)

    def _draw_draft(self, logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, params: SamplingParams
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a draft from MTP head logits [b, V] fp32: (tokens [b], filtered log-distribution [b, V]; None when
        greedy, where the acceptance rule does not read it)."""
        if params.greedy:
            return logits.argmax(-1), None
        logq = filtered_logprobs(logits, params)
        noise = gumbel_noise(keys ^ _DRAFT_SALT, steps, self._noise_basis(logits.shape[-1]))
        return (logq + noise).argmax(-1), logq

    def _commit_window(self, active: list[_Sequence], committed: torch.Tensor, offsets: list[int],
                       routing: torch.Tensor, params: SamplingParams) -> list[Event]:
        """Append each row's accepted drafts and correction token, cutting at a stop (the step's host sync).
        committed: :meth:`_speculative_forward`'s packed tokens, log-probs and accepted counts."""
        count, width = len(active), self.speculative_tokens + 1
        packed = committed[:count].tolist()
        tokens = [[int(t) for t in row[:width]] for row in packed]
        logprobs = [row[width:2 * width] for row in packed]
        accepted = [int(row[-1]) for row in packed]
        keep_routing = params.return_expert_ids and self.moe_layers
        if keep_routing:
            routing = routing[:, :count].cpu()  # [L_moe, count, W, k]
        events = []
        for row, s in enumerate(active):
            self.stats.drafted_tokens += self.speculative_tokens
            self.stats.accepted_tokens += accepted[row]
            emitted = 0
            for token, logprob in zip(tokens[row][: accepted[row] + 1], logprobs[row][: accepted[row] + 1]):
                events.append(self._append(s, token, logprob, params))
                emitted += 1
                if s.completion.finish_reason is not None:
                    break
            if keep_routing:  # the fed positions whose outputs committed: the last committed one onwards
                s.routing.append(routing[:, row, offsets[row] - 1: offsets[row] - 1 + emitted])
            self._collect_expert_ids(s, params)
        return events

    # ---------------------------------------------------------------- sampling
    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor, params: SamplingParams) -> list[Event]:
        """Draw each sequence's next token, append it, decide whether it finished; returns the events."""
        keys, steps = self._noise_inputs(seqs, len(seqs))
        tokens, logprobs = sample(logits, params, keys, steps, self._noise_basis(logits.shape[-1]))
        return self._emit(seqs, zip(tokens.tolist(), logprobs.tolist()), params)

    def _emit(self, seqs: list[_Sequence], drawn, params: SamplingParams) -> list[Event]:
        """Append each sequence's drawn (token, log-prob) and decide whether it finished; returns the events."""
        events = []
        for s, (token, logprob) in zip(seqs, drawn):
            events.append(self._append(s, int(token), logprob, params))
            self._collect_expert_ids(s, params)
        return events

    def _noise_inputs(self, seqs: list[_Sequence], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise keys [rows], generated counts [rows]) on the device; rows past the sequences get 0."""
        keys = [s.noise_key for s in seqs] + [0] * (rows - len(seqs))
        steps = [len(s.completion.token_ids) for s in seqs] + [0] * (rows - len(seqs))
        return torch.tensor(keys, device=self.device), torch.tensor(steps, device=self.device)

    def _append(self, seq: _Sequence, token: int, logprob: float, params: SamplingParams) -> Event:
        """Append one token to the completion and decide whether it finished."""
        seq.completion.token_ids.append(token)
        seq.completion.logprobs.append(logprob)
        seq.completion.finish_reason = self._finish_reason(seq, params)
        return seq.index, token, logprob

    def _collect_expert_ids(self, seq: _Sequence, params: SamplingParams) -> None:
        if seq.completion.finish_reason is not None and params.return_expert_ids:
            seq.completion.expert_ids = self._expert_ids(seq)

    def _expert_ids(self, seq: _Sequence) -> dict[int, torch.Tensor]:
        """MoE layer -> [len(prompt) + generated - 1, k] int32 (see Completion); frees the chunks."""
        if not seq.routing:
            return {}
        routing = torch.cat(seq.routing, dim=1)  # [L_moe, T - 1, k]
        seq.routing = []
        return {layer: routing[j] for j, layer in enumerate(self.moe_layers)}

    def _finish_reason(self, seq: _Sequence, params: SamplingParams) -> str | None:
        tokens = seq.completion.token_ids
        if tokens[-1] in params.stop_token_ids or (not params.ignore_eos and tokens[-1] == self.config.eos_token_id):
            return FINISH_STOP
        if params.stop_strings:
            # A stop string of c characters ends within the last 4c tokens (a token is at least one byte).
            window = 4 * max(len(s) for s in params.stop_strings)
            text = self.tokenizer.decode(tokens[-window:])
            if any(s in text for s in params.stop_strings):
                return FINISH_STOP
        if len(tokens) >= params.max_new_tokens or seq.length >= self.max_seq_len:
            return FINISH_LENGTH
        return None

    def _noise_basis(self, vocab: int) -> torch.Tensor:
        """hash32 of every vocabulary index [V] int64, made once."""
        if self._vocab_hash is None or self._vocab_hash.numel() != vocab:
            self._vocab_hash = hash32(torch.arange(vocab, dtype=torch.long, device=self.device))
        return self._vocab_hash


def sample(logits: torch.Tensor, params: SamplingParams, noise_keys: torch.Tensor, steps: torch.Tensor,
           vocab_hash: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row: (tokens [B] int64, fp32 log-probs [B] under the distribution sampled from).

    logits: [B, V] fp32 (or bf16: computed in fp32); noise_keys, steps: [B] int64 (see the module docstring);
    vocab_hash: hash32(arange(V)). Without filters (greedy or plain temperature) one op,
    ``torch.ops.ringkern.sample_tokens`` (on CUDA two launches instead of ~15 kernels of a decode step; greedy
    never forms the [B, V] log-softmax).
    """
    if not _filters(params, logits.shape[-1]):
        return torch.ops.ringkern.sample_tokens(logits.contiguous(), noise_keys.contiguous(), steps.contiguous(),
                                                float(params.temperature))
    logp = filtered_logprobs(logits.float(), params)  # [B, V], -inf = dropped
    tokens = (logp + gumbel_noise(noise_keys, steps, vocab_hash)).argmax(-1)
    return tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _filters(params: SamplingParams, vocab: int) -> bool:
    """Whether a draw applies top-k, top-p or min-p (greedy applies none)."""
    return not params.greedy and (0 < params.top_k < vocab or params.top_p < 1 or params.min_p > 0)


def filtered_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """fp32 log-probabilities [B, V] of the distribution sampled from (-inf = filtered out); greedy: the
    untempered distribution. logits: [B, V] fp32."""
    scaled = logits if params.greedy else filter_logits(logits / params.temperature, params)
    return scaled - logsumexp(scaled).unsqueeze(-1)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last axis [B, V] -> [B], at least one entry finite per row. Reductions that
    spread one row over many blocks: at decode batch sizes log_softmax's one block per row took 35 us of an
    H200's 1.1 ms batch-1 step (V = 157K)."""
    top = x.amax(-1, keepdim=True)
    return ((x - top).exp().sum(-1, keepdim=True).log() + top).squeeze(-1)


def verify_drafts(logits: torch.Tensor, drafts: torch.Tensor, draft_logq: torch.Tensor, params: SamplingParams,
                  noise_keys: torch.Tensor, steps: torch.Tensor, vocab_hash: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The speculative acceptance rule for k drafts per row (see the module docstring).

    logits: [B, k+1, V] fp32, the main model's at the positions predicting draft 1..k and the token after
    draft k; drafts: [B, k]; draft_logq: [B, k, V] the filtered log-distributions the drafts were drawn
    from (unused when greedy); noise_keys: [B]; steps: [B] generated index of draft 1.
    Returns (tokens [B, k+1], fp32 log-probs [B, k+1] under the main model's distribution the token
    follows, accepted [B] int64): a row commits tokens[:accepted + 1], its accepted drafts then the
    correction (drawn from normalize(max(p - q, 0))) or, after k accepts, the bonus token (drawn from p).
    """
    B, width, V = logits.shape
    k = width - 1
    index = torch.arange(width, device=logits.device)
    step_ids = steps.unsqueeze(1) + index  # [B, k+1]
    logp = filtered_logprobs(logits.reshape(B * width, V), params).view(B, width, V)
    if params.greedy:
        fallback = logits.argmax(-1)  # [B, k+1]
        accept = drafts == fallback[:, :k]
    else:
        keys = noise_keys.unsqueeze(1).expand(B, width)
        p, q = logp[:, :k].exp(), draft_logq.exp()  # [B, k, V]
        p_draft, q_draft = (t.gather(2, drafts.unsqueeze(-1)).squeeze(-1) for t in (p, q))  # [B, k]
        accept = hashed_uniform(keys[:, :k] ^ _ACCEPT_SALT, step_ids[:, :k]) * q_draft < p_draft
        residual = (p - q).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected
        resampled = _gumbel_argmax(residual.log(), keys[:, :k] ^ _RESIDUAL_SALT, step_ids[:, :k], vocab_hash)
        bonus = _gumbel_argmax(logp[:, k:], keys[:, k:], step_ids[:, k:], vocab_hash)
        fallback = torch.cat([resampled, bonus], dim=1)
    accepted = accept.long().cumprod(1).sum(1)  # [B] leading accepts
    tokens = torch.where(index < accepted.unsqueeze(1), torch.nn.functional.pad(drafts, (0, 1)), fallback)
    return tokens, logp.gather(2, tokens.unsqueeze(-1)).squeeze(-1), accepted


def _gumbel_argmax(logp: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, vocab_hash: torch.Tensor
                   ) -> torch.Tensor:
    """Gumbel-max draws [B, n] from log-weights [B, n, V] with the noise of (keys, steps) [B, n]."""
    B, n, V = logp.shape
    noise = gumbel_noise(keys.reshape(-1), steps.reshape(-1), vocab_hash).view(B, n, V)
    return (logp + noise).argmax(-1)


def filter_logits(scaled: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply top-k, then top-p, then min-p to tempered logits [B, V]; dropped tokens become -inf."""
    dropped = float("-inf")
    if 0 < params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, dropped)
    if params.top_p < 1:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), dropped)
    if params.min_p > 0:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, dropped)
    return scaled


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in [0, 2**32) (no overflow)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(noise_keys: torch.Tensor, steps: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] fp32, a fixed function of (key, step, vocabulary index)."""
    row = hash32(noise_keys ^ hash32(steps & _MASK32))  # [B]
    bits = hash32(row.unsqueeze(1) ^ vocab_hash) >> 9  # [B, V], 23 random bits
    # In (0, 1): with 24 bits, bits + 0.5 would round to 2**24 in fp32 for the top value, and u = 1 is +inf noise.
    uniform = (bits.float() + 0.5) / float(1 << 23)
    return -torch.log(-torch.log(uniform))


def hashed_uniform(noise_keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) fp32, a fixed function of (key, step); any matching shapes of int64 tensors."""
    bits = hash32(hash32(noise_keys ^ hash32(steps & _MASK32))) >> 9  # 23 random bits: see gumbel_noise
    return (bits.float() + 0.5) / float(1 << 23)


def _last_tokens(seq: _Sequence, count: int) -> list[int]:
    """The last ``count`` tokens of prompt + completion (count <= its length)."""
    tail = seq.completion.token_ids[len(seq.completion.token_ids) - count:] if count else []
    return seq.prompt[len(seq.prompt) - (count - len(tail)):] + tail if len(tail) < count else tail


def _noise_key(seed: int, completion_index: int) -> int:
    """32-bit noise key of one completion of a seeded call."""
    return random.Random(f"{seed}:{completion_index}").getrandbits(32)


def _prefill_groups(prompt_indices: list[int], prompts: list[list[int]]) -> Iterator[list[int]]:
    """Split joining prompts into prefill calls of at most _PREFILL_TOKENS padded tokens (at least one prompt)."""
    group: list[int] = []
    for p in prompt_indices:
        width = max([len(prompts[q]) for q in group] + [len(prompts[p])])
        if group and width * (len(group) + 1) > _PREFILL_TOKENS:
            yield group
            group = []
        group.append(p)
    if group:
        yield group


__all__ = ["Completion", "Engine", "EngineStats", "SamplingParams", "FINISH_LENGTH", "FINISH_STOP", "filter_logits",
           "filtered_logprobs", "gumbel_noise", "hash32", "hashed_uniform", "logsumexp", "sample", "verify_drafts"]
