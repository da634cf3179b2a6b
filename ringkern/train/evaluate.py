"""Held-out evaluation: answers to unseen problems (greedy, and optionally sampled), checked by each problem's verifier.

Accuracy counts exact answers only (reasoning-gym partial credit is 0). The held-out problems come
from :func:`ringkern.rewards.make_split`, which never shares a prompt with the training split.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..engine import Completion, Engine, SamplingParams
from ..model import RingFlashModel
from ..rewards import Problem, VerifiableReward
from ..tokenizer import RingTokenizer


def chat_prompt_ids(tokenizer: RingTokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Each problem's prompt as a Ring chat turn ending in the generation prompt ``<think>\\n``."""
    return [tokenizer.encode_chat([{"role": "user", "content": p.prompt}]) for p in problems]


@torch.no_grad()
def evaluate_accuracy(model: RingFlashModel, tokenizer: RingTokenizer, problems: Sequence[Problem], *,
                      max_new_tokens: int, max_seq_len: int, samples: int = 0, seed: int = 0,
                      max_batch: int = 64) -> dict[str, float]:
    """Greedy decoding of every problem: accuracy, mean response length, the share that stopped.

    samples > 0 adds ``sampled_accuracy``: the mean exact-answer rate of ``samples`` completions per
    problem drawn at temperature 1 (seeded), i.e. the policy's own expected accuracy.
    """
    prompts = chat_prompt_ids(tokenizer, problems)
    engine = Engine(model, max_batch=max(min(max_batch, len(prompts) * max(samples, 1)), samples),
                    max_seq_len=max_seq_len, tokenizer=tokenizer)
    stop = (tokenizer.eos_token_id,)
    completions = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                          stop_token_ids=stop))
    n = len(completions)
    out = {"accuracy": sum(_scores(tokenizer, problems, completions)) / n,
           "response_length": sum(len(c.token_ids) for c in completions) / n,
           "stopped_frac": sum(c.finish_reason == "stop" for c in completions) / n, "eval_items": float(n)}
    if samples > 0:
        sampled = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=samples,
                                                          seed=seed, stop_token_ids=stop))
        out["sampled_accuracy"] = sum(_scores(tokenizer, problems, sampled)) / len(sampled)
    return out


def _scores(tokenizer: RingTokenizer, problems: Sequence[Problem], completions: list[Completion]) -> list[float]:
    """Exact-answer score (1 or 0) of each completion against its problem (prompt-major order)."""
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    per_problem = len(completions) // len(problems)
    matched = [problems[i // per_problem] for i in range(len(completions))]
    return [float(s >= 1.0) for s in VerifiableReward(binary=True)(matched, texts)]


__all__ = ["chat_prompt_ids", "evaluate_accuracy"]
