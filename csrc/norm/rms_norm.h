// RMSNorm over the last dimension: host entry points of the CUDA kernels.
#pragma once
#include <torch/types.h>

namespace ringkern {

// y = x * rsqrt(mean(x^2) + eps) * weight; x [..., H], weight [H]; fp32 math.
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);

// (grad_x [..., H] in x's dtype, grad_weight [H] in weight's dtype); deterministic.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, double eps);

}  // namespace ringkern
