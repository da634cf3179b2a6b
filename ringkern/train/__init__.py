"""ringkern.train: long-CoT SFT, RLVR with GRPO + IcePop, and RLHF with a Bradley-Terry reward model.

Modules: :mod:`.config` (dataclasses, YAML, overrides), :mod:`.sft`, :mod:`.grpo` (the RL loop and its
loss), :mod:`.rlhf`, :mod:`.stages` (the stages as runnable units), :mod:`.evaluate` (held-out accuracy),
:mod:`.state` (exact-resume checkpoints, NaN guard), :mod:`.logging` (JSONL, TensorBoard, progress bar),
:mod:`.plot` and :mod:`.demo` (``ringkern demo``).
"""
from .config import TrainConfig, load_config
from .stages import run_stages

__all__ = ["TrainConfig", "load_config", "run_stages"]
