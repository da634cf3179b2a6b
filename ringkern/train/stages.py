"""The three stages of SPEC.md section 3 as runnable units: ``sft``, ``rlvr``, ``rlhf`` (or ``all``).

Each stage builds its starting model (:func:`ringkern.train.common.build_model`), trains, evaluates the
held-out split, and saves ``<out_dir>/<stage>/model``; the next stage starts from there. The summary
returned (and logged as an ``eval`` record at the stage's last step) holds the held-out accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..distributed import mesh as dist_mesh
from ..distributed import trainer as dist_trainer
from ..model import RingFlashModel
from ..rewards import ReasoningGymSource, VerifiableReward, make_split, worked_solution
from ..tokenizer import RingTokenizer
from .common import (build_model, configure_threads, load_tokenizer, model_dir, resolve_device, save_model,
                     stage_dir)
from .config import STAGES, TrainConfig
from .evaluate import evaluate_accuracy
from .grpo import GRPOContext, train_grpo
from .logging import RunLogger
from .sft import read_sft_jsonl, tokenize_examples, train_sft
from .state import seed_everything

CONFIG_FILE = "train_config.json"


@dataclass
class StageSetup:
    """What every stage of one run shares."""

    cfg: TrainConfig
    tokenizer: RingTokenizer
    device: torch.device
    train: ReasoningGymSource
    held_out: ReasoningGymSource

    def evaluator(self) -> Callable[[RingFlashModel], dict[str, float]]:
        task, max_len = self.cfg.task, self.cfg.model.max_seq_len
        return lambda model: evaluate_accuracy(model, self.tokenizer, self.held_out.problems,
                                               max_new_tokens=task.eval_max_new_tokens, max_seq_len=max_len,
                                               samples=task.eval_samples, seed=self.cfg.run.seed)


def setup(cfg: TrainConfig, tokenizer: RingTokenizer | None = None) -> StageSetup:
    """Device, threads, tokenizer and the train / held-out split of the task families (and, under
    torchrun, the process group: :func:`ringkern.distributed.trainer.setup`)."""
    dist_trainer.setup()
    configure_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist_mesh.is_main_process():
        (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    train, held_out = make_split(cfg.task.families, train_size=cfg.task.train_size, eval_size=cfg.task.eval_size,
                                 seed=cfg.run.seed, configs=cfg.task.configs or None)
    return StageSetup(cfg, tokenizer or load_tokenizer(cfg), resolve_device(cfg.run.device), train, held_out)


def run_sft(s: StageSetup) -> dict[str, float]:
    cfg = s.cfg
    if cfg.sft.data:
        pairs = read_sft_jsonl(cfg.sft.data)
    else:
        pairs = [(p.prompt, worked_solution(p)) for p in s.train.problems[: cfg.sft.num_examples]]
    examples = dist_mesh.shard_for_rank(tokenize_examples(pairs, s.tokenizer, cfg.model.max_seq_len))
    model = build_model(cfg, "sft", s.device)
    train_sft(model, examples, cfg.sft, out_dir=stage_dir(cfg, "sft"), run_dir=Path(cfg.run.out_dir),
              seed=cfg.run.seed, pad_id=s.tokenizer.pad_token_id, device=s.device,
              max_bad_steps=cfg.run.max_bad_steps, save_every=cfg.run.save_every, log_every=cfg.run.log_every,
              resume=cfg.run.resume, progress=cfg.run.progress, evaluate=s.evaluator(), eval_every=cfg.run.eval_every)
    return finish_stage(s, "sft", model, cfg.sft.steps)


def run_rlvr(s: StageSetup) -> dict[str, float]:
    cfg = s.cfg
    model = build_model(cfg, "rlvr", s.device)
    rule = VerifiableReward(binary=cfg.task.binary_reward)
    train_grpo(model, cfg.rlvr, grpo_context(s, "rlvr", rule))
    return finish_stage(s, "rlvr", model, cfg.rlvr.steps)


def grpo_context(s: StageSetup, stage: str, reward_fn) -> GRPOContext:
    cfg = s.cfg
    return GRPOContext(stage=stage, tokenizer=s.tokenizer, problems=s.train.problems, reward_fn=reward_fn,
                       correct_fn=VerifiableReward(binary=True), out_dir=stage_dir(cfg, stage),
                       run_dir=Path(cfg.run.out_dir), seed=cfg.run.seed, device=s.device,
                       max_seq_len=cfg.model.max_seq_len, rollout_dtype=getattr(torch, cfg.model.rollout_dtype),
                       max_bad_steps=cfg.run.max_bad_steps, save_every=cfg.run.save_every,
                       log_every=cfg.run.log_every, eval_every=cfg.run.eval_every, resume=cfg.run.resume,
                       progress=cfg.run.progress, evaluate=s.evaluator())


def finish_stage(s: StageSetup, stage: str, model: RingFlashModel, last_step: int) -> dict[str, float]:
    """Evaluate the held-out split, log it at the stage's last step and save the stage's model."""
    summary = s.evaluator()(model)
    with RunLogger(s.cfg.run.out_dir, stage, 0, progress=False) as logger:
        logger.log(last_step, summary, kind="eval")
    save_model(model, s.tokenizer, model_dir(s.cfg, stage))
    return summary


def evaluate_start(s: StageSetup) -> dict[str, float]:
    """Held-out accuracy of the model the first stage starts from (logged as stage "init")."""
    summary = s.evaluator()(build_model(s.cfg, "sft", s.device))
    with RunLogger(s.cfg.run.out_dir, "init", 0, progress=False) as logger:
        logger.log(0, summary, kind="eval")
    return summary


def run_stages(cfg: TrainConfig, stage: str) -> dict[str, dict[str, float]]:
    """Run one stage, or ``all`` of them in order; returns each stage's summary."""
    from .rlhf import run_rlhf  # rlhf builds on this module's helpers, so it is imported late

    runners = {"sft": run_sft, "rlvr": run_rlvr, "rlhf": run_rlhf}
    if stage != "all" and stage not in runners:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES + ('all',)}")
    s = setup(cfg)
    return {name: runners[name](s) for name in (STAGES if stage == "all" else (stage,))}


__all__ = ["StageSetup", "setup", "run_sft", "run_rlvr", "run_stages", "grpo_context", "finish_stage",
           "evaluate_start"]
