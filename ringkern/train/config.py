"""Training configuration: dataclasses with documented defaults, YAML files and dotted overrides.

A run is one :class:`TrainConfig`; each stage reads its own section::

    run:     where to write, seed, device, logging / eval / checkpoint cadence, NaN tolerance
    model:   the preset and its overrides, or a checkpoint to start from
    task:    the reasoning-gym task family that supplies prompts, SFT solutions and verifiers
    sft:     long-CoT SFT (stage "sft")
    rlvr:    GRPO + IcePop with verifiable rewards (stage "rlvr")
    reward_model / rlhf: the Bradley-Terry reward model, then GRPO + IcePop on its scores (stage "rlhf")

``load_config("configs/demo.yaml", ["rlvr.steps=20", "rlvr.correction=tis"])`` reads a YAML file
whose keys mirror these sections, then applies ``section.field=value`` overrides; values are parsed as
YAML (``1e-3`` -> float, ``true`` -> bool, ``[1, 2]`` -> list). Unknown keys are errors that name the
key and the fields allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"  # everything of the run: metrics.jsonl, tensorboard/, checkpoints, plots
    seed: int = 0  # seeds torch, numpy, python and every sampler of the run
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    log_every: int = 1  # JSONL/TensorBoard record every N optimizer steps
    eval_every: int = 0  # held-out evaluation every N steps of an RL stage (0: only at its end)
    save_every: int = 0  # training-state checkpoint every N steps (0: only the final model)
    max_bad_steps: int = 3  # abort after this many non-finite (NaN/Inf) steps in a row
    resume: bool = False  # continue each stage from its last training-state checkpoint
    progress: bool = True  # tqdm progress bar on stderr


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a RingConfig preset
    overrides: dict = field(default_factory=dict)  # RingConfig fields replacing the preset's
    init_from: str | None = None  # a save_pretrained directory; None: fresh weights (or the previous stage's)
    tokenizer: str | None = None  # a tokenizer.json; None: the tiny tokenizer
    rollout_dtype: str = "float32"  # dtype of the rollout engine's copy ("bfloat16" creates a mismatch)
    max_seq_len: int = 256  # prompt + response tokens; longer examples are dropped


@dataclass
class TaskConfig:
    families: list = field(default_factory=lambda: ["chain_sum"])  # reasoning-gym task names
    configs: dict = field(default_factory=dict)  # per-family reasoning-gym config; {}: rewards.EASY_TASK_CONFIGS
    train_size: int = 4000  # training items (SFT solutions and RL prompts)
    eval_size: int = 64  # held-out items (disjoint from training) scored by every evaluation
    eval_max_new_tokens: int = 64  # generation length of evaluations
    eval_samples: int = 0  # > 0: also the sampled accuracy (this many temperature-1 samples per item)
    binary_reward: bool = True  # RL reward 1 for an exact answer, else 0 (no reasoning-gym partial credit)


@dataclass
class SFTConfig:
    data: str | None = None  # JSONL of {"prompt", "response"}; None: worked solutions of task.family
    num_examples: int = 2000  # generated examples when data is None
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bucket_size: int = 64  # length bucketing: batches come from sorted windows of this many batches
    bias_update_rate: float = 1e-3  # aux-loss-free expert-bias step after every optimizer step


@dataclass
class GRPOConfig:
    steps: int = 30  # rollout batches (RL steps)
    prompts_per_step: int = 8
    group_size: int = 8  # G rollouts per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0  # rollout and log-prob temperature
    top_p: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1  # passes over each rollout batch
    minibatch_size: int = 32  # sequences per optimizer update (several updates per rollout batch)
    correction: str = "icepop"  # "icepop" | "tis" | "none"
    alpha: float = 0.5  # IcePop band [alpha, beta] on k = pi_train / pi_infer
    beta: float = 5.0
    tis_cap: float = 2.0  # TIS weight min(k, tis_cap)
    eps_low: float = 0.2  # PPO clip range [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2
    aggregation: str = "seq-mean-token-mean"  # or "token-mean"
    adv_eps: float = 1e-6  # A = (R - mean) / (std + adv_eps) within a group
    kl_coef: float = 0.0  # k3 KL to the frozen starting policy; 0 skips the reference model
    routing_replay: bool = False  # the training forward reuses the rollout's expert ids
    # Under torchrun: "replicated" (every rank decodes every prompt on the expert-parallel policy and updates
    # on all rollouts) or "data" (each rank decodes its share of the prompts on a whole copy of the policy,
    # which must fit a device, and takes its share of every minibatch)
    rollout_parallelism: str = "replicated"
    rollout_logprob_noise: float = 0.0  # std of Gaussian noise added to rollout log-probs (mismatch injection)
    bias_update_rate: float = 1e-3


@dataclass
class RewardModelConfig:
    data: str | None = None  # JSONL of {"prompt", "chosen", "rejected"}; None: generated pairs
    num_pairs: int = 256  # generated pairs when data is None
    eval_fraction: float = 0.25  # held-out share of the pairs
    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-3


@dataclass
class RLHFConfig:
    rm_weight: float = 1.0  # reward = rm_weight * RM score + rule_weight * rule reward
    rule_weight: float = 0.0
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(steps=5))


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rlvr: GRPOConfig = field(default_factory=GRPOConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGES = ("sft", "rlvr", "rlhf")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The defaults, updated by the YAML file at ``path`` (if any), then by ``section.field=value`` strings."""
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(data, overrides, where=str(path or "config"))


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "config") -> TrainConfig:
    """The defaults updated by ``data`` (nested sections, copied) and then by dotted overrides."""
    cfg = _update(TrainConfig(), copy.deepcopy(data), where)
    for item in overrides:
        apply_override(cfg, *parse_override(item))
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"rlvr.lr=3e-4"`` -> ("rlvr.lr", 3e-4); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r}: expected section.field=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def apply_override(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set the dotted field ``key`` of ``cfg`` (nested dataclasses; a dict field takes ``field.key``)."""
    *parents, last = key.split(".")
    obj: Any = cfg
    for i, name in enumerate(parents):
        if isinstance(obj, dict):
            obj = obj.setdefault(name, {})
            continue
        _check_field(obj, name, ".".join(parents[: i + 1]))
        obj = getattr(obj, name)
    if isinstance(obj, dict):
        obj[last] = value
        return
    _check_field(obj, last, key)
    setattr(obj, last, _coerce(obj, last, value, key))


def _update(obj: Any, data: dict, where: str) -> Any:
    for name, value in data.items():
        _check_field(obj, name, f"{where}: {name}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {name} must be a mapping, got {value!r}")
            _update(current, value, f"{where}: {name}")
        else:
            setattr(obj, name, _coerce(obj, name, value, f"{where}: {name}"))
    return obj


def _check_field(obj: Any, name: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ValueError(f"config key {where!r}: unknown; {type(obj).__name__} has {names}")


def _coerce(obj: Any, name: str, value: Any, where: str) -> Any:
    """Check ``value`` against the field's annotation; ints and numeric strings are accepted for floats."""
    hint = typing.get_type_hints(type(obj))[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if any(t is not type(None) and isinstance(value, typing.get_origin(t) or t) for t in allowed):
        if int in allowed and isinstance(value, bool) and bool not in allowed:
            raise ValueError(f"config key {where!r}: expected an int, got {value!r}")
        return value
    raise ValueError(f"config key {where!r}: expected {hint}, got {value!r}")


__all__ = ["TrainConfig", "RunConfig", "ModelConfig", "TaskConfig", "SFTConfig", "GRPOConfig",
           "RewardModelConfig", "RLHFConfig", "STAGES", "load_config", "config_from_dict", "parse_override", "apply_override"]
