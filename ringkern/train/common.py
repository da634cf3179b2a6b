"""What every stage shares: device and model set-up, the optimizer and LR schedule, stage directories.

Stage outputs live under ``run.out_dir``: ``<out_dir>/<stage>/model`` is the stage's final model in the
published format (with the tokenizer), ``<out_dir>/<stage>/state`` its resumable training states. A stage
starts from ``model.init_from`` when given, else from the newest earlier stage's model in the same run
directory, else from fresh weights seeded with ``run.seed``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..config import RingConfig
from ..distributed import trainer as dist_trainer
from ..model import RingFlashModel
from ..tokenizer import RingTokenizer, load_tiny_tokenizer
from .config import STAGES, TrainConfig

MODEL_DIR = "model"


def resolve_device(name: str) -> torch.device:
    if (rank_device := dist_trainer.resolve_device(name)) is not None:  # torchrun: cuda:LOCAL_RANK or cpu
        return rank_device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def load_tokenizer(cfg: TrainConfig) -> RingTokenizer:
    return RingTokenizer.from_file(cfg.model.tokenizer) if cfg.model.tokenizer else load_tiny_tokenizer()


def stage_dir(cfg: TrainConfig, stage: str) -> Path:
    return Path(cfg.run.out_dir) / stage


def model_dir(cfg: TrainConfig, stage: str) -> Path:
    return stage_dir(cfg, stage) / MODEL_DIR


def starting_point(cfg: TrainConfig, stage: str) -> Path | None:
    """The checkpoint a stage starts from: model.init_from, else the latest earlier stage's model."""
    if cfg.model.init_from:
        return Path(cfg.model.init_from)
    for earlier in reversed(STAGES[: STAGES.index(stage)]):
        candidate = model_dir(cfg, earlier)
        if (candidate / "config.json").is_file():
            return candidate
    return None


def build_model(cfg: TrainConfig, stage: str, device: torch.device) -> RingFlashModel:
    """The stage's starting model in fp32 (see :func:`starting_point`); fresh weights are seeded by run.seed.
    Under torchrun it comes parallelized (expert parallelism + FSDP2, :mod:`ringkern.distributed`)."""
    source = starting_point(cfg, stage)
    if source is not None:
        return dist_trainer.load_model(source, device)
    torch.manual_seed(cfg.run.seed)
    config = RingConfig.from_preset(cfg.model.preset, **cfg.model.overrides, torch_dtype="float32")
    return dist_trainer.prepare_model(RingFlashModel(config).to(device))


def save_model(model: RingFlashModel, tokenizer: RingTokenizer, directory: Path) -> Path:
    """Write the model (published format, fp32) and its tokenizer, atomically (rank 0 under torchrun)."""
    if dist_trainer.is_parallelized(model):
        return dist_trainer.save_model(model, directory, tokenizer)
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norm weights do not (expert biases are buffers, never optimized)."""
    if isinstance(model, FSDPModule):  # FSDP2 leaves the root unsharded after a forward: take the shards
        model.reshard()
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then cosine from lr to lr * min_lr_ratio at ``total_steps``
    (min_lr_ratio 1.0: constant after warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device):
    """bf16 autocast on the GPU (fp32 master weights); plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def merge_token_counts(total: dict[int, torch.Tensor], new: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Sum per-layer tokens_per_expert counts of several micro-batches."""
    for layer, counts in new.items():
        total[layer] = total[layer] + counts if layer in total else counts.clone()
    return total


__all__ = ["resolve_device", "configure_threads", "load_tokenizer", "stage_dir", "model_dir", "starting_point",
           "build_model", "save_model", "make_optimizer", "make_scheduler", "autocast", "merge_token_counts"]
