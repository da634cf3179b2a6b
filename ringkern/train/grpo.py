"""GRPO with the IcePop correction: the RL loop of the RLVR and RLHF stages (SPEC.md section 2).

One RL step, in order:

1. Rollouts. The :class:`ringkern.engine.Engine` samples G completions for each of P prompts from the
   current policy and returns pi_infer, the fp32 log-prob of every sampled token under the engine's
   own numerics (optionally a bf16 copy of the policy: ``model.rollout_dtype``). An optional Gaussian
   perturbation of those log-probs injects a controlled train-inference mismatch. Under torchrun the
   ranks decode every prompt together on the expert-parallel policy, or (``rollout_parallelism="data"``)
   each rank decodes its share on a whole copy, the rollouts are gathered, and steps 3-4 split every
   minibatch over the ranks too (:func:`rank_share`, :func:`loss_shares`).
2. Rewards and group advantages: A_i = (R_i - mean_group) / (std_group + eps). A group whose rewards
   are all equal has A = 0 everywhere: it carries no gradient, so it is dropped before the update
   instead of diluting the per-sequence mean.
3. Old log-probs: pi_train(y_t; theta_old) is recomputed by the training forward (same code path as the
   update, with routing replay if enabled) before any parameter changes; so is the reference policy's
   log-prob when a k3 KL term is on.
4. Updates: ``epochs`` passes over the kept sequences in shuffled minibatches, one optimizer step each,
   with :func:`ringkern.ops.icepop_policy_loss` (fused on CUDA, the reference on the CPU):
   k = pi_train(old) / pi_infer masks the token when k leaves [alpha, beta] (icepop), caps it (tis) or
   is ignored (none); r = pi_train(theta) / pi_train(old) is PPO-clipped.

The loss of a minibatch is :func:`policy_loss`; the step loop is :func:`train_grpo`.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .. import ops
from ..distributed import gather_full_copy, gather_full_state, is_parallelized
from ..distributed import mesh as dist_mesh
from ..engine import Completion, Engine, SamplingParams
from ..model import RingFlashModel, update_expert_biases
from ..rewards import Problem, RewardFn
from ..tokenizer import RingTokenizer
from .common import autocast, make_optimizer, make_scheduler
from .config import GRPOConfig
from .logging import RunLogger
from .state import NonFiniteGuard, TrainingState, latest_state, load_state, optimizer_step, save_state

Evaluator = Callable[[RingFlashModel], dict[str, float]]
ROLLOUT_PARALLELISM = ("replicated", "data")


@dataclass
class Rollout:
    """One sampled completion and everything the update needs about it."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: torch.Tensor  # [R] fp32, pi_infer (possibly perturbed)
    reward: float
    finished: bool  # stopped at eos (not cut at max_new_tokens)
    expert_ids: dict[int, torch.Tensor] | None = None  # MoE layer -> [P + R - 1, k] int32 from the engine
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None  # [R], pi_train(theta_old)
    ref_logprobs: torch.Tensor | None = None  # [R], frozen reference policy


@dataclass
class PolicyBatch:
    """Rollouts collated for one training forward. N = total response tokens of the batch."""

    input_ids: torch.Tensor  # [B, T] prompt + response, right-padded
    attention_mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [N] flat index into B*T of the hidden state that predicts each response token
    targets: torch.Tensor  # [N] response tokens
    cu_seqlens: torch.Tensor  # [B + 1] response boundaries in the flat [N] layout
    rollout_logprobs: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N], each sequence's advantage on all of its tokens
    loss_mask: torch.Tensor  # [N] bool
    old_logprobs: torch.Tensor | None = None  # [N]
    ref_logprobs: torch.Tensor | None = None  # [N]
    expert_ids: dict[int, torch.Tensor] | None = None  # MoE layer -> [B, T, k] for routing replay
    sequence_lengths: list[int] = field(default_factory=list)  # response length of each sequence


# ------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R - mean) / (std + eps) within consecutive groups of ``group_size`` (population std).

    rewards: [P * G]. A group with zero spread gets exactly 0 for every member.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    grouped = rewards.double().view(-1, group_size)  # [P, G]
    centered = grouped - grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, unbiased=False, keepdim=True)
    adv = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    return adv.view(-1).to(torch.float32)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: groups whose rewards are not all equal (the others have zero advantage)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) > 0


# ---------------------------------------------------------------------------------------- batches
def collate_rollouts(rollouts: Sequence[Rollout], pad_id: int, device: torch.device,
                     routing_replay: bool = False, top_k: int = 0) -> PolicyBatch:
    """Right-pad prompt + response of each rollout and lay the response tokens out flat.

    Position p of a sequence predicts token p + 1, so response token j of a prompt of length P is
    predicted at position P - 1 + j. With ``routing_replay`` the engine's expert ids fill positions
    [0, P + R - 1); the remaining positions (the last token, padding) predict nothing that is trained,
    and get the placeholder experts 0..k-1.
    """
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    B = len(rollouts)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.bool)
    positions, targets, lengths = [], [], []
    for i, r in enumerate(rollouts):
        P, R = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, : P + R] = torch.tensor(r.prompt_ids + r.response_ids)
        attention_mask[i, : P + R] = True
        positions.append(torch.arange(P - 1, P + R - 1) + i * width)
        targets.append(torch.tensor(r.response_ids))
        lengths.append(R)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    batch = PolicyBatch(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        positions=torch.cat(positions).to(device), targets=torch.cat(targets).to(device), cu_seqlens=cu.to(device),
        rollout_logprobs=torch.cat([r.rollout_logprobs for r in rollouts]).to(device),
        advantages=torch.cat([torch.full((len(r.response_ids),), r.advantage) for r in rollouts]).to(device),
        loss_mask=torch.ones(int(cu[-1]), dtype=torch.bool, device=device), sequence_lengths=lengths)
    if all(r.old_logprobs is not None for r in rollouts):
        batch.old_logprobs = torch.cat([r.old_logprobs for r in rollouts]).to(device)
    if all(r.ref_logprobs is not None for r in rollouts):
        batch.ref_logprobs = torch.cat([r.ref_logprobs for r in rollouts]).to(device)
    if routing_replay:
        batch.expert_ids = _replay_tensor(rollouts, width, top_k, device)
    return batch


def _replay_tensor(rollouts: Sequence[Rollout], width: int, top_k: int,
                   device: torch.device) -> dict[int, torch.Tensor]:
    """MoE layer -> [B, T, k] expert ids: the engine's where it routed, placeholders 0..k-1 elsewhere."""
    layers = rollouts[0].expert_ids.keys() if rollouts[0].expert_ids else ()
    out = {}
    for layer in layers:
        ids = torch.arange(top_k, dtype=torch.int32).expand(len(rollouts), width, top_k).clone()
        for i, r in enumerate(rollouts):
            recorded = r.expert_ids[layer]
            ids[i, : recorded.shape[0]] = recorded
        out[layer] = ids.to(device)
    return out


# ------------------------------------------------------------------------------------ log-probs
def policy_hidden(model: RingFlashModel, batch: PolicyBatch,
                  counted: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Final-norm hidden states [N, H] at the positions that predict the response tokens, and the
    forward's tokens_per_expert (none of the batch's tokens counted unless ``counted``)."""
    load_mask = None if counted else torch.zeros_like(batch.input_ids, dtype=torch.bool)
    out = model(batch.input_ids, attention_mask=batch.attention_mask, expert_ids=batch.expert_ids,
                compute_logits=False, compute_mtp=False, load_mask=load_mask)
    hidden = out.hidden_states.reshape(-1, out.hidden_states.shape[-1])
    return hidden[batch.positions], out.tokens_per_expert


@torch.no_grad()
def response_logprobs(model: RingFlashModel, batch: PolicyBatch, temperature: float) -> torch.Tensor:
    """log pi(y_t) [N] fp32 of the response tokens under ``model`` (the training path, no gradient)."""
    with autocast(batch.input_ids.device):
        hidden, _ = policy_hidden(model, batch)
        return ops.token_logprobs(hidden, model.lm_head.weight, batch.targets, temperature).float()


def split_per_sequence(values: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    return list(values.detach().cpu().split(list(lengths)))


# ----------------------------------------------------------------------------------------- loss
def policy_loss(model: RingFlashModel, batch: PolicyBatch, cfg: GRPOConfig, shares: tuple[float, float] = (1.0, 1.0),
                counted: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """The GRPO + IcePop loss of one minibatch (needs ``batch.old_logprobs``).

    Args:
        model: the policy being trained.
        batch: collated rollouts with old log-probs (and reference log-probs when ``cfg.kl_coef > 0``).
        cfg: correction mode and its band/cap, PPO clip range, temperature, aggregation, KL coefficient.
        shares: multipliers of the policy term and of the KL term (a data-parallel rank's part of the whole
            minibatch's denominators, see :func:`grpo_update`); the metrics are not scaled.
        counted: whether the batch's tokens count in the expert load (not a data-parallel stand-in's).

    Returns:
        (loss, metrics, tokens_per_expert). loss = -J of SPEC.md section 2 (+ kl_coef * k3 KL to the
        reference, averaged over response tokens). metrics: the diagnostics of
        :func:`ringkern.ops.icepop_policy_loss` (masked_low_frac, masked_high_frac, mean_abs_logp_diff,
        max_prob_gap, kl_train_infer, clip_frac, entropy, num_tokens), plus kl_ref with a reference.
    """
    with autocast(batch.input_ids.device):
        hidden, counts = policy_hidden(model, batch, counted)
        loss, metrics = ops.icepop_policy_loss(
            hidden, model.lm_head.weight, batch.targets, batch.old_logprobs, batch.rollout_logprobs,
            batch.advantages, batch.loss_mask, batch.cu_seqlens, alpha=cfg.alpha, beta=cfg.beta,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, temperature=cfg.temperature, correction=cfg.correction,
            aggregation=cfg.aggregation, tis_cap=cfg.tis_cap)
        loss = loss * shares[0]
        if cfg.kl_coef > 0:
            logp = ops.token_logprobs(hidden, model.lm_head.weight, batch.targets, cfg.temperature).float()
            kl = k3_kl(logp, batch.ref_logprobs, batch.loss_mask)
            loss = loss + cfg.kl_coef * shares[1] * kl
            metrics["kl_ref"] = kl.detach()
    return loss, metrics, counts


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) on samples of pi: mean of exp(d) - d - 1, d = log pi_ref - log pi."""
    d = (ref_logp - logp).clamp(-20, 20)
    per_token = d.exp() - d - 1
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


# ------------------------------------------------------------------------------------- rollouts
class RolloutPolicy:
    """The Engine over the policy. In the trainer's dtype it shares the model; otherwise it runs a copy
    cast to ``dtype`` (e.g. bf16) whose weights are refreshed from the policy before each rollout.

    data_parallel (a parallelized policy under torchrun): the copy is whole on every rank, gathered from
    the shards before each rollout, so each rank decodes its own prompts (:func:`sample_rollouts`)
    instead of all ranks decoding the same ones in lockstep on the expert-parallel policy.
    """

    def __init__(self, model: RingFlashModel, dtype: torch.dtype, *, max_batch: int, max_seq_len: int,
                 tokenizer: RingTokenizer, data_parallel: bool = False):
        self.model = model
        self.data_parallel = data_parallel and is_parallelized(model)
        if self.data_parallel:
            self.copy = gather_full_copy(model).to(dtype)
        else:
            self.copy = None if dtype == model.lm_head.weight.dtype else copy.deepcopy(model).to(dtype)
        self.engine = Engine(self.copy or model, max_batch=max_batch, max_seq_len=max_seq_len, tokenizer=tokenizer)

    @torch.no_grad()
    def sync(self) -> None:
        if self.copy is not None:
            self.copy.load_state_dict(gather_full_state(self.model) if self.data_parallel else self.model.state_dict())

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Completions from the engine; call :meth:`sync` first (on every rank when data parallel)."""
        return self.engine.generate(prompts, params)


def sample_rollouts(policy: RolloutPolicy, tokenizer: RingTokenizer, problems: Sequence[Problem],
                    prompt_ids: Sequence[list[int]], reward_fn: RewardFn, cfg: GRPOConfig, seed: int
                    ) -> tuple[list[Rollout], list[str]]:
    """G completions per problem, scored by ``reward_fn``; returns (rollouts prompt-major, decoded texts).

    With a data-parallel policy, rank r samples and scores problems r, r + W, ... (its own seed) and every
    rank gets all the rollouts back, in the same prompt-major order, for an identical update everywhere.
    """
    policy.sync()
    if not policy.data_parallel:
        return _sample_and_score(policy, tokenizer, problems, prompt_ids, reward_fn, cfg, seed)
    rank, world = dist_mesh.rank(), dist_mesh.world_size()
    mine = list(range(rank, len(problems), world))
    local = _sample_and_score(policy, tokenizer, [problems[i] for i in mine], [prompt_ids[i] for i in mine],
                              reward_fn, cfg, seed * world + rank)
    shares = [None] * world
    dist.all_gather_object(shares, (mine, *local))  # between the job's own ranks: trusted objects
    groups: dict[int, tuple[list[Rollout], list[str]]] = {}
    G = cfg.group_size
    for indices, rollouts, texts in shares:
        for j, i in enumerate(indices):
            groups[i] = (rollouts[j * G:(j + 1) * G], texts[j * G:(j + 1) * G])
    return ([r for i in range(len(problems)) for r in groups[i][0]],
            [t for i in range(len(problems)) for t in groups[i][1]])


def _sample_and_score(policy: RolloutPolicy, tokenizer: RingTokenizer, problems: Sequence[Problem],
                      prompt_ids: Sequence[list[int]], reward_fn: RewardFn, cfg: GRPOConfig, seed: int
                      ) -> tuple[list[Rollout], list[str]]:
    """:func:`sample_rollouts` on this process's engine alone."""
    if not problems:
        return [], []
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, n=cfg.group_size,
                            max_new_tokens=cfg.max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,),
                            return_expert_ids=cfg.routing_replay)
    completions = policy.generate([list(p) for p in prompt_ids], params)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    rewards = reward_fn([problems[c.prompt_index] for c in completions], texts)
    noise = torch.Generator().manual_seed(seed)
    rollouts = []
    for c, reward in zip(completions, rewards):
        logprobs = torch.tensor(c.logprobs, dtype=torch.float32)
        if cfg.rollout_logprob_noise > 0:
            perturbation = torch.randn(logprobs.shape, generator=noise) * cfg.rollout_logprob_noise
            logprobs = (logprobs + perturbation).clamp(max=0.0)
        rollouts.append(Rollout(list(prompt_ids[c.prompt_index]), list(c.token_ids), logprobs, float(reward),
                                c.finish_reason == "stop", c.expert_ids))
    return rollouts, texts


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def attach_logprobs(model: RingFlashModel, rollouts: list[Rollout], cfg: GRPOConfig, pad_id: int,
                    device: torch.device, attribute: str = "old_logprobs", data_parallel: bool = False) -> None:
    """Set ``rollout.<attribute>`` to the response log-probs under ``model`` (computed in minibatches).
    data_parallel: each rank computes its share of every minibatch (:func:`rank_share`), then all of them
    are gathered, so every rank ends with all the values."""
    values: dict[int, torch.Tensor] = {}
    for part in chunks(range(len(rollouts)), cfg.minibatch_size):
        mine, real = rank_share(part, data_parallel)
        batch = collate_rollouts([rollouts[i] for i in mine], pad_id, device, cfg.routing_replay,
                                 model.config.num_experts_per_tok)
        logp = split_per_sequence(response_logprobs(model, batch, cfg.temperature), batch.sequence_lengths)
        values.update(zip(mine, logp) if real else ())
    if data_parallel and dist_mesh.is_distributed():
        shares = [None] * dist_mesh.world_size()
        dist.all_gather_object(shares, values)  # between the job's own ranks: trusted objects
        values = {i: v for share in shares for i, v in share.items()}
    for i, rollout in enumerate(rollouts):
        setattr(rollout, attribute, values[i])


def rank_share(part: Sequence[int], data_parallel: bool) -> tuple[list[int], bool]:
    """This rank's rollouts of a minibatch (indices ``part``): every W-th one from its rank when data parallel
    under torchrun, else all. A rank left with none gets the first one as a stand-in (returned with
    False: run at weight 0, not counted in the expert load, results discarded), so every rank makes the
    same collective calls."""
    if not (data_parallel and dist_mesh.is_distributed()):
        return list(part), True
    mine = list(part[dist_mesh.rank()::dist_mesh.world_size()])
    return (mine, True) if mine else ([part[0]], False)


def loss_shares(rollouts: Sequence[Rollout], part: Sequence[int], mine: Sequence[int], real: bool,
                aggregation: str) -> tuple[float, float]:
    """The (policy term, KL term) multipliers of this rank in a data-parallel minibatch: world size x its
    part of the minibatch's denominators (sequences, or response tokens for "token-mean"; the KL term is
    a token mean), so that FSDP's average of the ranks' gradients is the gradient of the whole minibatch."""
    if not real:
        return 0.0, 0.0
    tokens = lambda idx: sum(len(rollouts[i].response_ids) for i in idx)  # noqa: E731
    world = dist_mesh.world_size()
    token_share = world * tokens(mine) / tokens(part)
    return (token_share if aggregation == "token-mean" else world * len(mine) / len(part)), token_share


# ------------------------------------------------------------------------------------- updates
def grpo_update(model: RingFlashModel, optimizer, scheduler, rollouts: list[Rollout], cfg: GRPOConfig,
                guard: NonFiniteGuard, step: int, seed: int, pad_id: int, device: torch.device,
                data_parallel: bool = False) -> dict[str, float]:
    """``cfg.epochs`` passes of shuffled minibatch updates; returns token-weighted mean diagnostics.

    data_parallel (under torchrun; every rank holds the same rollouts): each rank runs its share of every
    minibatch (:func:`rank_share`) with its loss scaled by :func:`loss_shares`, so the averaged gradient is
    that of the whole minibatch; the diagnostics are gathered over the ranks.
    """
    rng = random.Random(f"{seed}:{step}")
    world = dist_mesh.world_size()
    sums: dict[str, float] = {}
    tokens, updates, skipped, max_gap, grad_norms = 0.0, 0, 0, 0.0, []
    for _ in range(cfg.epochs):
        order = list(range(len(rollouts)))
        rng.shuffle(order)
        for part in chunks(order, cfg.minibatch_size):
            mine, real = rank_share(part, data_parallel)
            batch = collate_rollouts([rollouts[i] for i in mine], pad_id, device, cfg.routing_replay,
                                     model.config.num_experts_per_tok)
            shares = loss_shares(rollouts, part, mine, real, cfg.aggregation) if data_parallel else (1.0, 1.0)
            loss, metrics, counts = policy_loss(model, batch, cfg, shares, counted=real)
            loss.backward()
            result = optimizer_step(model, optimizer, scheduler, loss.detach(), guard, step, cfg.grad_clip)
            if not result["skipped"]:
                update_expert_biases(model, counts, cfg.bias_update_rate)
            n = float(metrics.pop("num_tokens"))  # popped on every rank: the same metric names everywhere
            n = n if real else 0.0
            gap = float(metrics.pop("max_prob_gap"))
            max_gap = max(max_gap, gap) if real else max_gap
            if data_parallel:  # a rank's scaled loss is W x its part of the minibatch's loss
                value, weight = float(loss.detach()) / world, sum(len(rollouts[i].response_ids) for i in part)
            else:
                value, weight = float(loss.detach()), n
            sums["loss"] = sums.get("loss", 0.0) + value * weight
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            tokens += n
            updates += 1
            skipped += int(result["skipped"])
            grad_norms.append(result["grad_norm"])
    if data_parallel and dist_mesh.is_distributed():
        names = sorted(sums)
        totals = torch.tensor([sums[name] for name in names] + [tokens], dtype=torch.float64, device=device)
        gap = torch.tensor([max_gap], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        sums, tokens, max_gap = dict(zip(names, totals[:-1].tolist())), float(totals[-1]), float(gap)
    out = {name: total / max(tokens, 1.0) for name, total in sums.items()}
    out.update(max_prob_gap=max_gap, updates=updates, skipped=skipped, train_tokens=tokens,
               grad_norm=sum(grad_norms) / max(len(grad_norms), 1))
    return out


def rollout_metrics(rollouts: Sequence[Rollout], kept: int, groups: int, correct: Sequence[bool]) -> dict[str, float]:
    n = len(rollouts)
    return {"reward": sum(r.reward for r in rollouts) / n, "accuracy": sum(correct) / n,
            "response_length": sum(len(r.response_ids) for r in rollouts) / n,
            "truncated_frac": sum(not r.finished for r in rollouts) / n,
            "informative_group_frac": kept / groups}


# ------------------------------------------------------------------------------------ the loop
@dataclass
class GRPOContext:
    """Everything :func:`train_grpo` needs besides the model and its config."""

    stage: str
    tokenizer: RingTokenizer
    problems: Sequence[Problem]  # training prompts, consumed in order (wrapping around)
    reward_fn: RewardFn  # the reward that drives the advantages
    correct_fn: RewardFn  # exact-answer check, logged as the training accuracy
    out_dir: Path  # the stage directory (training states)
    run_dir: Path  # metrics.jsonl / tensorboard
    seed: int
    device: torch.device
    max_seq_len: int
    rollout_dtype: torch.dtype = torch.float32
    max_bad_steps: int = 3
    save_every: int = 0
    log_every: int = 1
    eval_every: int = 0
    resume: bool = False
    progress: bool = True
    evaluate: Evaluator | None = None


def train_grpo(model: RingFlashModel, cfg: GRPOConfig, ctx: GRPOContext) -> list[dict[str, float]]:
    """Run ``cfg.steps`` GRPO steps on ``model`` in place; returns the per-step metrics."""
    tok = ctx.tokenizer
    prompt_ids = [tok.encode_chat([{"role": "user", "content": p.prompt}]) for p in ctx.problems]
    if cfg.rollout_parallelism not in ROLLOUT_PARALLELISM:
        raise ValueError(f"rollout_parallelism={cfg.rollout_parallelism!r}: expected one of {ROLLOUT_PARALLELISM}")
    data_parallel = cfg.rollout_parallelism == "data"
    prompts_per_rank = -(-cfg.prompts_per_step // dist_mesh.world_size()) if data_parallel else cfg.prompts_per_step
    policy = RolloutPolicy(model, ctx.rollout_dtype, max_batch=prompts_per_rank * cfg.group_size,
                           max_seq_len=ctx.max_seq_len, tokenizer=tok, data_parallel=data_parallel)
    reference = _frozen_copy(model) if cfg.kl_coef > 0 else None
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, ctx.device)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    guard = NonFiniteGuard(ctx.max_bad_steps)
    state = TrainingState()
    if ctx.resume and (path := latest_state(ctx.out_dir)) is not None:
        state = load_state(path, model, optimizer, scheduler)
    history = []
    with RunLogger(ctx.run_dir, ctx.stage, cfg.steps, start_step=state.step, progress=ctx.progress) as logger:
        for step in range(state.step + 1, cfg.steps + 1):
            metrics = grpo_step(model, policy, reference, optimizer, scheduler, guard, cfg, ctx, prompt_ids,
                                state.data_position, step)
            state.data_position += cfg.prompts_per_step
            state.step = step
            if metrics.get("skipped"):
                logger.write(f"{ctx.stage} step {step}: {int(metrics['skipped'])} non-finite update(s) skipped")
            if ctx.evaluate is not None and ctx.eval_every and step % ctx.eval_every == 0:
                logger.log(step, ctx.evaluate(model), kind="eval")
            if step % ctx.log_every == 0 or step == cfg.steps:
                logger.log(step, metrics)
            logger.advance(metrics)
            history.append(metrics)
            if ctx.save_every and step % ctx.save_every == 0:
                save_state(ctx.out_dir, model, optimizer, scheduler, state)
    return history


def grpo_step(model, policy: RolloutPolicy, reference, optimizer, scheduler, guard: NonFiniteGuard,
              cfg: GRPOConfig, ctx: GRPOContext, prompt_ids: list[list[int]], position: int,
              step: int) -> dict[str, float]:
    """Rollouts, advantages, old log-probs and the minibatch updates of one RL step."""
    started = time.perf_counter()
    n = len(ctx.problems)
    picked = [(position + i) % n for i in range(cfg.prompts_per_step)]
    problems = [ctx.problems[i] for i in picked]
    rollouts, texts = sample_rollouts(policy, ctx.tokenizer, problems, [prompt_ids[i] for i in picked],
                                      ctx.reward_fn, cfg, seed=ctx.seed * 1_000_003 + step)
    rollout_time = time.perf_counter() - started
    rewards = torch.tensor([r.reward for r in rollouts])
    for rollout, adv in zip(rollouts, group_advantages(rewards, cfg.group_size, cfg.adv_eps).tolist()):
        rollout.advantage = adv
    keep = informative_groups(rewards, cfg.group_size).repeat_interleave(cfg.group_size).tolist()
    trained = [r for r, k in zip(rollouts, keep) if k]
    correct = [c >= 1.0 for c in ctx.correct_fn([problems[i // cfg.group_size] for i in range(len(texts))], texts)]
    metrics = rollout_metrics(rollouts, sum(keep) // cfg.group_size, cfg.prompts_per_step, correct)
    metrics["lr"] = scheduler.get_last_lr()[0]
    if trained:
        pad = ctx.tokenizer.pad_token_id
        split = policy.data_parallel  # each rank's share of the forwards too
        attach_logprobs(model, trained, cfg, pad, ctx.device, data_parallel=split)
        if reference is not None:
            attach_logprobs(reference, trained, cfg, pad, ctx.device, attribute="ref_logprobs", data_parallel=split)
        metrics.update(grpo_update(model, optimizer, scheduler, trained, cfg, guard, step, ctx.seed, pad, ctx.device,
                                   data_parallel=split))
    elapsed = time.perf_counter() - started
    generated = sum(len(r.response_ids) for r in rollouts)
    metrics.update(rollout_time_s=rollout_time, step_time_s=elapsed, rollout_tokens_per_s=generated / rollout_time)
    return metrics


def _frozen_copy(model: RingFlashModel) -> RingFlashModel:
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference


__all__ = ["Rollout", "PolicyBatch", "group_advantages", "informative_groups", "collate_rollouts",
           "policy_hidden", "response_logprobs", "policy_loss", "k3_kl", "RolloutPolicy", "sample_rollouts",
           "attach_logprobs", "rank_share", "loss_shares", "grpo_update", "GRPOContext", "train_grpo", "grpo_step"]
