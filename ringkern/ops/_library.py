"""Registers the Python side of every ``torch.ops.ringkern`` op.

The schemas and the CUDA kernels live in the native extension ``ringkern._C``. Here each op gets its CPU
kernel (the pure-PyTorch reference, so the dispatcher picks the implementation by device), a fake (meta)
kernel so ``torch.compile`` can trace it, and its autograd formula.
"""
from __future__ import annotations

import torch

from . import reference as ref

try:
    from .. import _C  # noqa: F401  (loading it registers the op schemas and CUDA kernels)
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError("ringkern._C is not built: install with `pip install --no-build-isolation .`") from err


def _register_rms_norm() -> None:
    torch.library.register_kernel("ringkern::rms_norm", "cpu", ref.rms_norm)
    torch.library.register_kernel("ringkern::rms_norm_backward", "cpu", ref.rms_norm_backward)

    @torch.library.register_fake("ringkern::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("ringkern::rms_norm_backward")
    def _(grad_out, x, weight, eps):
        return torch.empty_like(x), torch.empty_like(weight)

    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = torch.ops.ringkern.rms_norm_backward(grad_out.contiguous(), x, weight, ctx.eps)
        return grad_x, grad_w, None

    torch.library.register_autograd("ringkern::rms_norm", backward, setup_context=setup_context)


_register_rms_norm()
