// RMSNorm over the last dimension: host entry points of the CUDA kernels.
#pragma once
#include <torch/types.h>

namespace ringkern {

// y = x * rsqrt(mean(x^2) + eps) * weight; x [..., H], weight [H]; fp32 math.
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);

// (grad_x [..., H] in x's dtype, grad_weight [H] in weight's dtype); deterministic.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, double eps);

// Building blocks for fused callers (no argument checks; 2-D tensors whose rows are contiguous):
// y[r, :] = rms_norm(x[r, :]) for x [N, H] contiguous, y [N, H] with any row stride (e.g. half of a
// wider GEMM operand).
void rms_norm_forward_out(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, double eps);
// Gradients for grad_out [N, H] with any row stride: (grad_x [N, H] contiguous, grad_weight [H]).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_strided(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& weight, double eps);

}  // namespace ringkern
