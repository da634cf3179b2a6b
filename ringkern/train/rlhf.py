"""Stage 3, RLHF: a Bradley-Terry reward model, then GRPO + IcePop on its scores.

1. Preference pairs ``{"prompt", "chosen", "rejected"}`` come from ``reward_model.data`` (JSONL) or are
   generated from training problems (chosen: the worked solution; rejected: a flawed one, see
   :func:`ringkern.reward_model.generate_preference_pairs`). The last ``eval_fraction`` of them is held out.
2. The reward model (:class:`ringkern.reward_model.RewardModel`: the policy's architecture and weights
   plus a scalar head on the final token) is trained with the Bradley-Terry loss and scored by its
   held-out pair accuracy; it is saved to ``<out_dir>/rlhf/reward_model``. Under torchrun every rank holds
   the whole reward model (gathered from the sharded policy) and trains it data parallel.
3. GRPO + IcePop (``rlhf.grpo``) with reward = weighted mean of sigmoid(RM score) and the rule reward
   (``rlhf.rm_weight``, ``rlhf.rule_weight``; a zero weight drops the term).
"""
from __future__ import annotations

import torch.distributed as dist

from ..distributed import mesh as dist_mesh
from ..reward_model import (PreferenceDataset, RewardModel, RewardModelReward, evaluate_reward_model,
                            generate_preference_pairs, read_preference_jsonl, train_reward_model)
from ..rewards import CompositeReward, VerifiableReward
from .common import build_model, stage_dir
from .grpo import train_grpo
from .logging import RunLogger
from .stages import StageSetup, finish_stage, grpo_context

REWARD_MODEL_DIR = "reward_model"


def preference_splits(s: StageSetup) -> tuple[PreferenceDataset, PreferenceDataset]:
    """(train, held-out) tokenized preference pairs (held-out: the last eval_fraction, at least one)."""
    rm = s.cfg.reward_model
    if rm.data:
        pairs = read_preference_jsonl(rm.data)
    else:
        problems = s.train.problems[-rm.num_pairs:]
        pairs = generate_preference_pairs(problems, seed=s.cfg.run.seed)
    n_eval = max(1, round(len(pairs) * rm.eval_fraction))
    if n_eval >= len(pairs):
        raise ValueError(f"{len(pairs)} preference pairs: too few to hold out {n_eval} for evaluation")
    max_len = s.cfg.model.max_seq_len
    return (PreferenceDataset(pairs[:-n_eval], s.tokenizer, max_length=max_len),
            PreferenceDataset(pairs[-n_eval:], s.tokenizer, max_length=max_len))


def train_stage_reward_model(s: StageSetup, policy) -> tuple[RewardModel, dict[str, float]]:
    """Train the reward model from a copy of ``policy``; returns it and its held-out accuracy before/after."""
    cfg = s.cfg.reward_model
    train_pairs, eval_pairs = preference_splits(s)
    model = RewardModel.from_policy(policy)
    before = evaluate_reward_model(model, eval_pairs)
    with RunLogger(s.cfg.run.out_dir, "reward_model", cfg.steps, progress=s.cfg.run.progress) as logger:
        def log(record: dict) -> None:
            step = record.pop("step")
            logger.log(step, record)
            logger.advance(record)

        result = train_reward_model(model, train_pairs, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                    seed=s.cfg.run.seed, eval_pairs=eval_pairs, eval_every=s.cfg.run.eval_every,
                                    log=log)
        summary = {"rm_accuracy_before": before, "rm_accuracy": result["eval_accuracy"],
                   "rm_eval_pairs": float(len(eval_pairs)), "rm_train_pairs": float(len(train_pairs))}
        logger.log(cfg.steps, summary, kind="eval")
    if dist_mesh.is_main_process():  # under torchrun every rank holds the same whole reward model
        model.save_pretrained(stage_dir(s.cfg, "rlhf") / REWARD_MODEL_DIR, tokenizer=s.tokenizer)
    if dist_mesh.is_distributed():
        dist.barrier()
    return model, summary


def run_rlhf(s: StageSetup) -> dict[str, float]:
    cfg = s.cfg
    policy = build_model(cfg, "rlhf", s.device)
    reward_model, rm_summary = train_stage_reward_model(s, policy)
    reward_model.requires_grad_(False)
    terms = {"rm": (RewardModelReward(reward_model, s.tokenizer, batch_size=cfg.rlhf.grpo.minibatch_size,
                                      max_length=cfg.model.max_seq_len), cfg.rlhf.rm_weight),
             "rule": (VerifiableReward(binary=cfg.task.binary_reward), cfg.rlhf.rule_weight)}
    reward = CompositeReward({name: term for name, term in terms.items() if term[1] > 0})
    train_grpo(policy, cfg.rlhf.grpo, grpo_context(s, "rlhf", reward))
    return {**finish_stage(s, "rlhf", policy, cfg.rlhf.grpo.steps), **rm_summary}


__all__ = ["preference_splits", "train_stage_reward_model", "run_rlhf", "REWARD_MODEL_DIR"]
