"""ringkern: train and serve Ring-flash-2.0 sparse MoE reasoning models, with IcePop RL.

``RingConfig`` and ``RingFlashModel`` are the model; :mod:`ringkern.ops` holds the kernels (CUDA) and their
pure-PyTorch references (CPU); :mod:`ringkern.checkpoint` reads and writes the published format;
``Engine`` generates (KV cache, continuous batching, CUDA graphs) with ``SamplingParams``, returning ``Completion``s.
"""
from .config import PRESETS, RingConfig
from .engine import Completion, Engine, SamplingParams
from .model import RingFlashModel, RingOutput, update_expert_biases

__version__ = "0.1.0"
__all__ = ["PRESETS", "Completion", "Engine", "RingConfig", "RingFlashModel", "RingOutput", "SamplingParams",
           "update_expert_biases", "__version__"]
