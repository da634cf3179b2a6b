// RMSNorm forward and backward kernels (one block per row; fp32 accumulation).
#include "rms_norm.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/check.h"

namespace ringkern {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  return total;
}

template <typename T, typename W>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                                    int64_t cols, int64_t y_stride, float eps) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * y_stride;
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = static_cast<float>(xr[c]);
    sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sq, scratch) / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    yr[c] = static_cast<T>(static_cast<float>(xr[c]) * inv_rms * static_cast<float>(weight[c]));
  }
}

// Each block walks rows blockIdx.x, blockIdx.x + gridDim.x, ... and writes its partial grad_weight
// (fp32, one row of `partial_dw` per block); the host sums the partials in a fixed order (deterministic).
template <typename T, typename W>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                    const W* __restrict__ weight, T* __restrict__ grad_x,
                                    float* __restrict__ partial_dw, int64_t rows, int64_t cols,
                                    int64_t grad_stride, float eps) {
  extern __shared__ float dw[];  // [cols]
  __shared__ float scratch[kThreads / 32];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dw[c] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* gr = grad_out + row * grad_stride;
    float sq = 0.f, dot = 0.f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float xv = static_cast<float>(xr[c]);
      sq += xv * xv;
      dot += static_cast<float>(gr[c]) * static_cast<float>(weight[c]) * xv;
    }
    const float inv_rms = rsqrtf(block_sum(sq, scratch) / static_cast<float>(cols) + eps);
    // mean(g_hat * x_hat) with x_hat = x * inv_rms
    const float mean_gx = block_sum(dot, scratch) * inv_rms / static_cast<float>(cols);
    T* gxr = grad_x + row * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float x_hat = static_cast<float>(xr[c]) * inv_rms;
      const float g = static_cast<float>(gr[c]);
      gxr[c] = static_cast<T>(inv_rms * (g * static_cast<float>(weight[c]) - x_hat * mean_gx));
      dw[c] += g * x_hat;
    }
  }
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) partial_dw[blockIdx.x * cols + c] = dw[c];
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  check_same_device(weight, x, "weight");
  check_contiguous(x, "x");
  check_contiguous(weight, "weight");
  check_dtype(x, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_dtype(weight, "weight", {at::kFloat, at::kBFloat16, at::kHalf});
  RK_CHECK_ARG(x.dim() >= 1, "x", "expected at least 1 dimension");
  RK_CHECK_ARG(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight", "expected shape [", x.size(-1),
               "] (x's last dim), got ", weight.sizes());
}

#define RK_DISPATCH_NORM_TYPES(X_TYPE, W_TYPE, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X_TYPE, "rms_norm_x", [&] {      \
    using x_t = scalar_t;                                                                    \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_TYPE, "rms_norm_w", [&] {    \
      using w_t = scalar_t;                                                                  \
      __VA_ARGS__();                                                                         \
    });                                                                                      \
  })

}  // namespace

void rms_norm_forward_out(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, double eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  RK_DISPATCH_NORM_TYPES(x.scalar_type(), weight.scalar_type(), [&] {
    rms_norm_fwd_kernel<x_t, w_t><<<rows, kThreads, 0, stream>>>(
        x.data_ptr<x_t>(), weight.data_ptr<w_t>(), y.data_ptr<x_t>(), cols, y.stride(0), static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_strided(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  auto grad_x = at::empty_like(x);
  if (rows == 0 || cols == 0) return {grad_x, at::zeros_like(weight)};
  const size_t smem = cols * sizeof(float);
  RK_CHECK_ARG(smem <= 96 * 1024, "x", "last dim ", cols, " exceeds the kernel's shared-memory limit (24576)");
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(rows, 2 * sms);
  auto partial = at::empty({blocks, cols}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  RK_DISPATCH_NORM_TYPES(x.scalar_type(), weight.scalar_type(), [&] {
    auto kernel = rms_norm_bwd_kernel<x_t, w_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    kernel<<<blocks, kThreads, smem, stream>>>(grad_out.data_ptr<x_t>(), x.data_ptr<x_t>(), weight.data_ptr<w_t>(),
                                               grad_x.data_ptr<x_t>(), partial.data_ptr<float>(), rows, cols,
                                               grad_out.stride(0), static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, partial.sum(0).to(weight.scalar_type())};
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_inputs(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t cols = x.size(-1);
  auto y2d = y.view({-1, cols});
  rms_norm_forward_out(x.view({-1, cols}), weight, y2d, eps);
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, double eps) {
  check_inputs(x, weight);
  check_same_device(grad_out, x, "grad_out");
  check_contiguous(grad_out, "grad_out");
  RK_CHECK_ARG(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), "grad_out",
               "expected shape ", x.sizes(), " and dtype ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return {at::empty_like(x), at::zeros_like(weight)};
  const int64_t cols = x.size(-1);
  auto [grad_x, grad_w] = rms_norm_backward_strided(grad_out.view({-1, cols}), x.view({-1, cols}), weight, eps);
  return {grad_x.view(x.sizes()), grad_w};
}

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace ringkern
