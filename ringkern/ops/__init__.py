"""The ops every ringkern model, engine and trainer calls.

Ops backed by ``torch.ops.ringkern`` dispatch by device: CUDA kernels from ``csrc/`` on the GPU, the
pure-PyTorch references of :mod:`ringkern.ops.reference` on the CPU. The remaining functions are the
references themselves until their kernels land; callers never branch on the device.
"""
from __future__ import annotations

import torch

from . import _library  # noqa: F401  (registers CPU, fake and autograd kernels)
from .reference import (AGGREGATIONS, CORRECTIONS, apply_partial_rope, attention, expert_bias_update,
                        icepop_policy_loss, linear_cross_entropy, moe_experts, moe_route, rope_cos_sin,
                        rope_frequencies, rope_inv_freq, token_logprobs)

__all__ = ["AGGREGATIONS", "CORRECTIONS", "apply_partial_rope", "attention", "expert_bias_update",
           "icepop_policy_loss", "linear_cross_entropy", "moe_experts", "moe_route", "rms_norm",
           "rope_cos_sin", "rope_frequencies", "rope_inv_freq", "token_logprobs"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math, output in x's dtype); differentiable."""
    return torch.ops.ringkern.rms_norm(x.contiguous(), weight, eps)
