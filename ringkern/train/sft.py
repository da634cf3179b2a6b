"""Stage 1, long-CoT SFT: next-token loss on the response tokens of chat-formatted worked solutions.

Each example is rendered with the Ring chat template (:meth:`RingTokenizer.format_sft_example`); the
loss is the model's :meth:`RingFlashModel.sft_loss` (response tokens only, plus the MTP loss). Batches
are length-bucketed: every epoch is a seeded permutation, cut into windows of ``bucket_size`` batches
that are sorted by length before batching, so a batch pads little and batch order stays random. The
data position is the number of micro-batches consumed, which is all a resume needs.

One step: ``grad_accum`` micro-batches (bf16 autocast on the GPU), gradient clipping, AdamW with
warmup + cosine, then the aux-loss-free expert-bias update from the step's token counts.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..model import IGNORE_INDEX, RingFlashModel, update_expert_biases
from ..tokenizer import RingTokenizer
from .common import autocast, make_optimizer, make_scheduler, merge_token_counts
from .config import SFTConfig
from .logging import RunLogger
from .state import NonFiniteGuard, TrainingState, latest_state, load_state, optimizer_step, save_state

Example = tuple[list[int], list[int]]  # (prompt_ids, response_ids)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor  # [B, T] bool

    def to(self, device: torch.device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device))


def read_sft_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file of {"prompt": ..., "response": ...} lines."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
                raise ValueError(f"{path}:{n}: expected string fields 'prompt' and 'response'")
            pairs.append((row["prompt"], row["response"]))
    return pairs


def tokenize_examples(pairs: list[tuple[str, str]], tokenizer: RingTokenizer, max_seq_len: int) -> list[Example]:
    """Chat-format each (prompt, response); examples longer than max_seq_len are dropped."""
    examples = [tokenizer.format_sft_example(p, r) for p, r in pairs]
    kept = [(p, r) for p, r in examples if len(p) + len(r) <= max_seq_len]
    if not kept:
        raise ValueError(f"no SFT example fits model.max_seq_len={max_seq_len}")
    return kept


def collate(examples: list[Example], pad_id: int) -> SFTBatch:
    """Right-pad prompt + response; labels only on the response."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (prompt, response) in enumerate(examples):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt):n] = torch.tensor(response)
        mask[i, :n] = True
    return SFTBatch(ids, labels, mask)


class BucketedBatches:
    """Micro-batch ``i`` of the endless, length-bucketed stream of batches (a pure function of seed and i)."""

    def __init__(self, examples: list[Example], batch_size: int, bucket_size: int, seed: int):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} SFT examples: need at least batch_size={batch_size}")
        self.examples, self.batch_size, self.bucket_size, self.seed = examples, batch_size, bucket_size, seed
        self.per_epoch = len(examples) // batch_size
        self._epoch, self._batches = -1, []

    def __getitem__(self, position: int) -> list[Example]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return [self.examples[i] for i in self._batches[index]]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        order = order[: self.per_epoch * self.batch_size]
        window = self.bucket_size * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self.examples[i][0]) + len(self.examples[i][1]))
            group = [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
            rng.shuffle(group)
            batches.extend(group)
        return batches


def sft_step(model: RingFlashModel, micro_batches: list[SFTBatch], device: torch.device
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[str, float]]:
    """Forward/backward of one optimizer step's micro-batches; returns (mean loss, token counts, parts)."""
    total, counts, parts_sum = torch.zeros((), device=device), {}, {}
    for batch in micro_batches:
        batch = batch.to(device)
        with autocast(device):
            loss, parts = model.sft_loss(batch.input_ids, batch.labels, attention_mask=batch.attention_mask)
        (loss / len(micro_batches)).backward()
        total = total + loss.detach() / len(micro_batches)
        merge_token_counts(counts, parts.pop("tokens_per_expert"))
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + float(value.detach()) / len(micro_batches)
    return total, counts, parts_sum


def train_sft(model: RingFlashModel, examples: list[Example], cfg: SFTConfig, *, out_dir: Path, run_dir: Path,
              seed: int, pad_id: int, device: torch.device, max_bad_steps: int = 3, save_every: int = 0,
              log_every: int = 1, resume: bool = False, progress: bool = True,
              evaluate: Callable[[RingFlashModel], dict[str, float]] | None = None, eval_every: int = 0,
              ) -> list[dict[str, float]]:
    """Run ``cfg.steps`` SFT steps on ``examples`` in place; returns the per-step metrics.

    out_dir: the stage directory (training states); run_dir: where metrics.jsonl lives. With ``resume``
    the newest state in out_dir is restored first and training continues after its step.
    """
    batches = BucketedBatches(examples, cfg.batch_size, cfg.bucket_size, seed)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    guard = NonFiniteGuard(max_bad_steps)
    state = TrainingState()
    if resume and (path := latest_state(out_dir)) is not None:
        state = load_state(path, model, optimizer, scheduler)
    history = []
    with RunLogger(run_dir, "sft", cfg.steps, start_step=state.step, progress=progress) as logger:
        for step in range(state.step + 1, cfg.steps + 1):
            started = time.perf_counter()
            micro = [collate(batches[state.data_position + j], pad_id) for j in range(cfg.grad_accum)]
            state.data_position += cfg.grad_accum
            lr = scheduler.get_last_lr()[0]
            loss, counts, parts = sft_step(model, micro, device)
            metrics = {"loss": float(loss), "lr": lr, **parts,
                       **optimizer_step(model, optimizer, scheduler, loss, guard, step, cfg.grad_clip)}
            if not metrics["skipped"]:
                metrics.update(update_expert_biases(model, counts, cfg.bias_update_rate))
            tokens = sum(int(b.attention_mask.sum()) for b in micro)
            metrics["tokens_per_s"] = tokens / (time.perf_counter() - started)
            if metrics["skipped"]:
                logger.write(f"sft step {step}: non-finite loss or gradient, update skipped")
            if evaluate is not None and eval_every and step % eval_every == 0:
                logger.log(step, evaluate(model), kind="eval")
            if step % log_every == 0 or step == cfg.steps:
                logger.log(step, metrics)
            logger.advance(metrics)
            history.append(metrics)
            state.step = step
            if save_every and step % save_every == 0:
                save_state(out_dir, model, optimizer, scheduler, state)
    return history


__all__ = ["SFTBatch", "Example", "read_sft_jsonl", "tokenize_examples", "collate", "BucketedBatches", "sft_step",
           "train_sft"]
