"""RLHF reward model: a Ring backbone with a scalar head on the last real token, trained Bradley-Terry.

``RewardModel`` = :class:`ringkern.model.RingFlashModel` (run with ``compute_logits=False,
compute_mtp=False``; its lm_head is kept only so the backbone stays a loadable checkpoint) plus
``score_head`` Linear(H, 1) on the final-norm hidden state of each sequence's last token with
attention_mask 1 (right or left padding). Text goes in through the chat template: the prompt as a user
turn, the response as the assistant turn ending with eos, exactly as the policy produced it.

Data: JSONL lines ``{"prompt", "chosen", "rejected"}`` (:func:`read_preference_jsonl`), or pairs made
from nothing by :func:`generate_preference_pairs` (chosen = the worked solution of a reasoning-gym
problem, rejected = a flawed one: wrong answer, wrong step, or truncated).

Files: :meth:`RewardModel.save_pretrained` writes the backbone with :mod:`ringkern.checkpoint` and the
head to ``score_head.safetensors`` in the same directory (no pickles).

Shape legend: B sequences (2P for P pairs: chosen rows first), T tokens, H hidden.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RingConfig
from .distributed import gather_full_copy, is_parallelized
from .distributed import mesh as dist_mesh
from .model import RingFlashModel, update_expert_biases
from .rewards import FLAW_KINDS, Problem, flawed_solution, worked_solution
from .tokenizer import RingTokenizer

HEAD_FILE = "score_head.safetensors"


# ====================================================================== model
class RewardModel(nn.Module):
    """Backbone + scalar head. ``forward(input_ids [B, T], attention_mask [B, T]) -> scores [B]`` (fp32)."""

    def __init__(self, config: RingConfig | None = None, *, backbone: RingFlashModel | None = None):
        super().__init__()
        if (config is None) == (backbone is None):
            raise ValueError("RewardModel: pass exactly one of config= (a fresh backbone) or backbone=")
        self.backbone = backbone if backbone is not None else RingFlashModel(config)
        self.config = self.backbone.config
        self.score_head = nn.Linear(self.config.hidden_size, 1, device=self.backbone.lm_head.weight.device)
        with torch.no_grad():
            self.score_head.weight.normal_(0.0, 1.0 / math.sqrt(self.config.hidden_size))
            self.score_head.bias.zero_()

    @classmethod
    def from_policy(cls, policy: RingFlashModel) -> "RewardModel":
        """A reward model whose backbone starts as a copy of ``policy`` (e.g. the SFT model). A parallelized
        policy (under torchrun) is gathered: every rank gets a whole, unsharded copy."""
        backbone = gather_full_copy(policy) if is_parallelized(policy) else copy.deepcopy(policy)
        return cls(backbone=backbone).to(device=backbone.lm_head.weight.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_routing(input_ids, attention_mask)[0]

    def forward_with_routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(scores [B] fp32, tokens_per_expert of each MoE layer, for the expert-bias update)."""
        out = self.backbone(input_ids, attention_mask=attention_mask, compute_logits=False, compute_mtp=False)
        last = last_token_index(input_ids, attention_mask)  # [B]
        pooled = out.hidden_states[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # [B, H]
        scores = self.score_head(pooled.to(self.score_head.weight.dtype)).squeeze(-1).float()
        return scores, out.tokens_per_expert

    # ------------------------------------------------------------ files
    def save_pretrained(self, path: str | os.PathLike, *, tokenizer=None) -> Path:
        """Backbone via :func:`ringkern.checkpoint.save_pretrained` (atomic directory), then the head
        (atomic file). A crash between the two leaves a directory that :meth:`from_pretrained` rejects."""
        path = Path(path)
        self.backbone.save_pretrained(path, tokenizer=tokenizer)
        head = {"weight": self.score_head.weight.detach().float().cpu().contiguous(),
                "bias": self.score_head.bias.detach().float().cpu().contiguous()}
        tmp = path / f".{HEAD_FILE}.tmp-{os.getpid()}"
        save_file(head, str(tmp), metadata={"format": "ringkern-reward-head",
                                            "hidden_size": str(self.config.hidden_size)})
        os.replace(tmp, path / HEAD_FILE)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "RewardModel":
        path = Path(path)
        head_file = path / HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(f"RewardModel.from_pretrained: {head_file} is missing (not a reward model "
                                    "checkpoint, or its save was interrupted)")
        model = cls(backbone=RingFlashModel.from_pretrained(path, dtype=dtype, device=device))
        head = load_file(str(head_file))
        H = model.config.hidden_size
        shapes = {name: tuple(t.shape) for name, t in head.items()}
        if shapes != {"weight": (1, H), "bias": (1,)}:
            raise ValueError(f"{head_file}: expected tensors weight [1, {H}] and bias [1], got {shapes}")
        with torch.no_grad():
            model.score_head.weight.copy_(head["weight"])
            model.score_head.bias.copy_(head["bias"])
        return model

    # ------------------------------------------------------------ scoring text
    @torch.no_grad()
    def score(self, tokenizer: RingTokenizer, prompts_and_completions: Sequence[tuple[str, str]], *,
              batch_size: int = 16, max_length: int | None = None) -> torch.Tensor:
        """Scores [N] (fp32, CPU) of (prompt, completion) pairs rendered by :func:`encode_exchange`."""
        sequences = [encode_exchange(tokenizer, p, c, max_length) for p, c in prompts_and_completions]
        return self._score_ids(sequences, tokenizer.pad_token_id, batch_size)

    def _score_ids(self, sequences: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = self.score_head.weight.device
        scores = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_right(sequences[start: start + batch_size], pad_id, device)
            scores.append(self(ids, mask).cpu())
        self.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0)


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B] position of each row's last token with mask 1 (T-1 without a mask)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask: expected shape {(B, T)} like input_ids, got {tuple(attention_mask.shape)}")
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values
    if bool((last < 0).any()):
        raise ValueError("attention_mask: a row has no token (all zeros)")
    return last


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(chosen - rejected), averaged over pairs. Both [P]."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
                         f"{tuple(rejected_scores.shape)}: expected equal 1-D shapes [P]")
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()


# ====================================================================== data
@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def encode_exchange(tokenizer: RingTokenizer, prompt: str, response: str, max_length: int | None = None) -> list[int]:
    """Token ids of the chat prompt plus the response and eos (the reward model's input); with
    ``max_length``, the start is cut so that the end, where the score is read, survives."""
    prompt_ids, response_ids = tokenizer.format_sft_example(prompt, response)
    ids = prompt_ids + response_ids
    return ids[-max_length:] if max_length is not None else ids


def read_preference_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """Pairs from a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects (strings); errors name the line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            fields = ("prompt", "chosen", "rejected")
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in fields):
                raise ValueError(f"{path}:{lineno}: expected string fields 'prompt', 'chosen' and 'rejected'")
            pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"]))
    return pairs


def write_preference_jsonl(pairs: Sequence[PreferencePair], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected},
                               ensure_ascii=False) + "\n")
    return path


def generate_preference_pairs(problems: Sequence[Problem], *, seed: int = 0,
                              kinds: Sequence[str] = FLAW_KINDS) -> list[PreferencePair]:
    """One pair per problem: chosen = :func:`worked_solution`, rejected = :func:`flawed_solution` of a
    kind drawn from ``kinds`` (deterministic in ``seed``)."""
    bad = [k for k in kinds if k not in FLAW_KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds={list(kinds)!r}: expected a non-empty subset of {FLAW_KINDS}")
    rng = random.Random(seed)
    return [PreferencePair(p.prompt, worked_solution(p), flawed_solution(p, rng.choice(list(kinds)), rng))
            for p in problems]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs: item i is (chosen_ids, rejected_ids), each prompt + response + eos.

    pairs: a list of :class:`PreferencePair` or a JSONL path; max_length: keep the last tokens only.
    """

    def __init__(self, pairs: Sequence[PreferencePair] | str | os.PathLike, tokenizer: RingTokenizer, *,
                 max_length: int | None = None):
        if isinstance(pairs, (str, os.PathLike)):
            pairs = read_preference_jsonl(pairs)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length}: expected >= 2 or None")
        self.pairs = list(pairs)
        self.pad_id = tokenizer.pad_token_id
        self.items = [(encode_exchange(tokenizer, p.prompt, p.chosen, max_length),
                       encode_exchange(tokenizer, p.prompt, p.rejected, max_length)) for p in self.pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.items[i]

    def collate(self, indices: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [2P, T], attention_mask [2P, T]): the P chosen rows, then the P rejected rows."""
        rows = [self.items[i][0] for i in indices] + [self.items[i][1] for i in indices]
        return pad_right(rows, self.pad_id, device)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], mask [B, T] bool) of token lists padded on the right to the longest."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("rows: expected at least one non-empty token list")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


# ====================================================================== training
def _pair_scores(model: RewardModel, data: PreferenceDataset, indices: Sequence[int]):
    ids, mask = data.collate(indices, device=model.score_head.weight.device)
    scores, tokens_per_expert = model.forward_with_routing(ids, mask)
    P = len(indices)
    return scores[:P], scores[P:], tokens_per_expert


def train_reward_model(model: RewardModel, train_pairs: PreferenceDataset, *, steps: int, lr: float = 3e-4,
                       batch_size: int = 8, weight_decay: float = 0.0, warmup_steps: int = 0,
                       grad_clip: float = 1.0, expert_bias_rate: float = 1e-3, seed: int = 0,
                       eval_pairs: PreferenceDataset | None = None, eval_every: int = 0,
                       log: Callable[[dict], None] | None = None) -> dict:
    """AdamW on the Bradley-Terry loss over shuffled minibatches of ``batch_size`` pairs; linear warmup
    then a constant learning rate; gradient clipping; the expert-bias update after every step.

    Every ``eval_every`` steps (and at the end) with ``eval_pairs``: held-out accuracy. ``log`` gets one
    dict per step (step, loss, accuracy of the batch, lr, grad_norm, and eval_accuracy when measured).
    Returns {"steps", "final_loss", "losses", "eval_accuracy" (last, or None), "eval_history"}.

    Under torch.distributed with several ranks (each holding the same whole model): data parallel. Each
    rank draws its minibatches from its own shard of the pairs; gradients, loss and accuracy are averaged
    and the per-expert token counts summed over the ranks before the update, so every rank takes the
    same step (a step sees world_size x batch_size pairs).
    """
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, lr={lr}: expected positive values")
    _check_pairs("train_pairs", train_pairs)
    if eval_pairs is not None:
        _check_pairs("eval_pairs", eval_pairs)
    world = dist_mesh.world_size()
    if len(train_pairs) < world:
        raise ValueError(f"train_pairs: {len(train_pairs)} pairs for {world} ranks; expected at least one per rank")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = _shuffled_batches(list(range(dist_mesh.rank(), len(train_pairs), world)), batch_size, seed)
    losses, history = [], []
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup_steps) if warmup_steps else lr
        chosen, rejected, tokens_per_expert = _pair_scores(model, train_pairs, next(order))
        loss = bradley_terry_loss(chosen, rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss, accuracy = loss.detach(), (chosen > rejected).float().mean()
        if world > 1:
            loss, accuracy = _average_over_ranks(model, tokens_per_expert, loss, accuracy)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        update_expert_biases(model.backbone, tokens_per_expert, rate=expert_bias_rate)
        losses.append(loss.item())
        record = {"step": step, "loss": losses[-1], "accuracy": accuracy.item(),
                  "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm)}
        if eval_pairs is not None and ((eval_every and step % eval_every == 0) or step == steps):
            record["eval_accuracy"] = evaluate_reward_model(model, eval_pairs, batch_size=2 * batch_size)
            history.append((step, record["eval_accuracy"]))
        if log is not None:
            log(record)
    return {"steps": steps, "final_loss": losses[-1], "losses": losses,
            "eval_accuracy": history[-1][1] if history else None, "eval_history": history}


def _average_over_ranks(model: nn.Module, tokens_per_expert: dict[int, torch.Tensor],
                        *metrics: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Data parallelism of :func:`train_reward_model`: all-reduce the gradients (mean, in buckets of up to
    ``_BUCKET_BYTES``; parameters without a gradient, such as the unused lm_head, have none on every rank),
    the token counts (sum, in place) and ``metrics`` (scalars, mean)."""
    world = dist.get_world_size()
    for bucket in _buckets([p.grad for p in model.parameters() if p.grad is not None], _BUCKET_BYTES):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))
    for bucket in _buckets(list(tokens_per_expert.values()), _BUCKET_BYTES):
        flat = torch.cat([c.reshape(-1) for c in bucket])
        dist.all_reduce(flat)
        for c, part in zip(bucket, flat.split([c.numel() for c in bucket])):
            c.copy_(part.view_as(c))
    stacked = torch.stack([m.float() for m in metrics])
    dist.all_reduce(stacked)
    return tuple((stacked / world).unbind())


_BUCKET_BYTES = 64 << 20


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``tensors`` with one dtype and device, each at most ``max_bytes`` (or one tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last is None or (t.dtype, t.device) != (last[0].dtype, last[0].device) or size + nbytes > max_bytes:
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


def _check_pairs(name: str, pairs) -> None:
    if not isinstance(pairs, PreferenceDataset):
        raise ValueError(f"{name}: expected a PreferenceDataset (tokenized pairs), got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError(f"{name}: no pairs")


def _shuffled_batches(indices: Sequence[int], batch_size: int, seed: int):
    """Endless minibatches of ``indices``: a fresh permutation per epoch (seeded), the last short batch kept."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(indices), generator=generator).tolist()
        for start in range(0, len(indices), batch_size):
            yield [indices[i] for i in perm[start: start + batch_size]]


@torch.no_grad()
def evaluate_reward_model(model: RewardModel, pairs: PreferenceDataset, *, batch_size: int = 16) -> float:
    """Fraction of pairs with score(chosen) > score(rejected) (a tie counts as wrong)."""
    _check_pairs("pairs", pairs)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chosen, rejected, _ = _pair_scores(model, pairs, range(start, min(start + batch_size, len(pairs))))
        correct += int((chosen > rejected).sum())
    model.train(was_training)
    return correct / len(pairs)


# ====================================================================== as an RL reward
class RewardModelReward:
    """A :class:`ringkern.rewards.RewardFn`: sigmoid of the reward model's score of (prompt, completion),
    in (0, 1), so it mixes with rule rewards in :class:`ringkern.rewards.CompositeReward`.

    temperature: scores are divided by it before the sigmoid (the BT scale is arbitrary).
    """

    def __init__(self, model: RewardModel, tokenizer: RingTokenizer, *, batch_size: int = 16,
                 temperature: float = 1.0, max_length: int | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: expected > 0")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.temperature, self.max_length = batch_size, temperature, max_length

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        if len(problems) != len(completions):
            raise ValueError(f"problems ({len(problems)}) and completions ({len(completions)}): expected equal lengths")
        completions = [c if isinstance(c, str) else "" for c in completions]
        scores = self.model.score(self.tokenizer, [(p.prompt, c) for p, c in zip(problems, completions)],
                                  batch_size=self.batch_size, max_length=self.max_length)
        return torch.sigmoid(scores / self.temperature).tolist()


__all__ = ["RewardModel", "RewardModelReward", "PreferencePair", "PreferenceDataset", "bradley_terry_loss",
           "last_token_index", "encode_exchange", "pad_right", "read_preference_jsonl", "write_preference_jsonl",
           "generate_preference_pairs", "train_reward_model", "evaluate_reward_model", "HEAD_FILE"]
