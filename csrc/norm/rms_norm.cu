// RMSNorm forward and backward kernels (a warp per short row, a block per long row; 16-byte accesses when
// aligned; fp32 accumulation).
#include "rms_norm.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/check.h"
#include "../common/pdl.h"

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

// N consecutive elements as fp32: 16-byte loads when N elements of T fill whole 16-byte words (the
// caller guarantees alignment), element loads otherwise.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  if constexpr (sizeof(T) * N % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < N / kPer; ++j) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + j * kPer);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) out[j * kPer + k] = static_cast<float>(v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<float>(p[k]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
  if constexpr (sizeof(T) * N % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < N / kPer; ++j) {
      uint4 raw;
      T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[k] = static_cast<T>(in[j * kPer + k]);
      *reinterpret_cast<uint4*>(p + j * kPer) = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = static_cast<T>(in[k]);
  }
}

// A row is handled by one warp (kWarpRows: short rows, kThreads / 32 rows per block) or by the whole
// block; each thread reads N elements at a time. Row sums over the row's threads.
template <bool kWarpRows>
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  if constexpr (kWarpRows) {
    return warp_sum(v);
  } else {
    return block_sum(v, scratch);
  }
}

template <bool kWarpRows>
struct RowLayout {
  static constexpr int kLanes = kWarpRows ? 32 : kThreads;
  static constexpr int kRowsPerBlock = kThreads / kLanes;
  __device__ static int lane() { return kWarpRows ? threadIdx.x % 32 : threadIdx.x; }
  __device__ static int slot() { return kWarpRows ? threadIdx.x / 32 : 0; }
};

template <typename T, typename W, int N, bool kWarpRows>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                                    int64_t rows, int64_t cols, int64_t y_stride, float eps) {
  using L = RowLayout<kWarpRows>;
  __shared__ float scratch[kThreads / 32];
  allow_next_grid();
  wait_for_previous_grid();  // a programmatic dependent launch: x comes from the previous kernel
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRowsPerBlock + L::slot();
  if (row >= rows) return;  // whole warps only (kWarpRows), or the whole block: no barrier is skipped
  const T* xr = x + row * cols;
  T* yr = y + row * y_stride;
  float sq = 0.f;
  for (int64_t c = static_cast<int64_t>(L::lane()) * N; c < cols; c += L::kLanes * N) {
    float v[N];
    load_f32<T, N>(xr + c, v);
#pragma unroll
    for (int k = 0; k < N; ++k) sq = fmaf(v[k], v[k], sq);
  }
  const float inv_rms = rsqrtf(row_sum<kWarpRows>(sq, scratch) / static_cast<float>(cols) + eps);
  for (int64_t c = static_cast<int64_t>(L::lane()) * N; c < cols; c += L::kLanes * N) {
    float v[N], w[N];
    load_f32<T, N>(xr + c, v);
    load_f32<W, N>(weight + c, w);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = v[k] * inv_rms * w[k];
    store_f32<T, N>(yr + c, v);
  }
}

// Rows are spread over the grid (row-groups blockIdx.x, blockIdx.x + gridDim.x, ...); each row-group slot
// accumulates grad_weight (fp32) for its own rows in shared memory, and the block writes the sum of its
// slots as one row of `partial_dw`; the host sums the partials in a fixed order (deterministic).
template <typename T, typename W, int N, bool kWarpRows>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                    const W* __restrict__ weight, T* __restrict__ grad_x,
                                    float* __restrict__ partial_dw, int64_t rows, int64_t cols,
                                    int64_t grad_stride, float eps) {
  using L = RowLayout<kWarpRows>;
  extern __shared__ float dw_all[];  // [kRowsPerBlock, cols]
  __shared__ float scratch[kThreads / 32];
  float* dw = dw_all + L::slot() * cols;
  for (int64_t c = L::lane(); c < cols; c += L::kLanes) dw[c] = 0.f;
  for (int64_t group = blockIdx.x; group * L::kRowsPerBlock < rows; group += gridDim.x) {
    const int64_t row = group * L::kRowsPerBlock + L::slot();
    const bool live = row < rows;  // a dead warp still joins no barrier: kWarpRows reductions are warp-local
    if (kWarpRows && !live) continue;
    const T* xr = x + row * cols;
    const T* gr = grad_out + row * grad_stride;
    float sq = 0.f, dot = 0.f;
    for (int64_t c = static_cast<int64_t>(L::lane()) * N; c < cols; c += L::kLanes * N) {
      float xv[N], gv[N], wv[N];
      load_f32<T, N>(xr + c, xv);
      load_f32<T, N>(gr + c, gv);
      load_f32<W, N>(weight + c, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        sq = fmaf(xv[k], xv[k], sq);
        dot = fmaf(gv[k] * wv[k], xv[k], dot);
      }
    }
    const float inv_rms = rsqrtf(row_sum<kWarpRows>(sq, scratch) / static_cast<float>(cols) + eps);
    // mean(g_hat * x_hat) with x_hat = x * inv_rms
    const float mean_gx = row_sum<kWarpRows>(dot, scratch) * inv_rms / static_cast<float>(cols);
    T* gxr = grad_x + row * cols;
    for (int64_t c = static_cast<int64_t>(L::lane()) * N; c < cols; c += L::kLanes * N) {
      float xv[N], gv[N], wv[N], out[N];
      load_f32<T, N>(xr + c, xv);
      load_f32<T, N>(gr + c, gv);
      load_f32<W, N>(weight + c, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float x_hat = xv[k] * inv_rms;
        out[k] = inv_rms * (gv[k] * wv[k] - x_hat * mean_gx);
        dw[c + k] += gv[k] * x_hat;
      }
      store_f32<T, N>(gxr + c, out);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    float total = 0.f;
    for (int s = 0; s < L::kRowsPerBlock; ++s) total += dw_all[s * cols + c];
    partial_dw[blockIdx.x * cols + c] = total;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  check_same_device(weight, x, "weight");
  check_contiguous(x, "x");
  check_contiguous(weight, "weight");
  check_dtype(x, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_dtype(weight, "weight", {at::kFloat, x.scalar_type()});
  RK_CHECK_ARG(x.dim() >= 1, "x", "expected at least 1 dimension");
  RK_CHECK_ARG(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight", "expected shape [", x.size(-1),
               "] (x's last dim), got ", weight.sizes());
}

// Calls f(x_t{}, w_t{}, std::integral_constant<int, N>{}, std::bool_constant<kWarpRows>{}) for x in fp32,
// bf16 or fp16, the weight in fp32 or x's dtype, N = 16 / sizeof(x_t) when every row and pointer is
// 16-byte aligned (else 1), and warp-per-row for rows of at most 4 accesses per lane.
template <typename F>
void dispatch_norm(at::ScalarType x_type, at::ScalarType w_type, bool aligned, int64_t cols, F&& f) {
  auto with_x = [&](auto x_tag) {
    using x_t = decltype(x_tag);
    constexpr int kVec = 16 / sizeof(x_t);
    auto with_w = [&](auto w_tag) {
      const int n = aligned ? kVec : 1;
      const bool warp_rows = cols <= int64_t{32} * 4 * n;
      if (aligned && warp_rows) f(x_tag, w_tag, std::integral_constant<int, kVec>{}, std::true_type{});
      else if (aligned) f(x_tag, w_tag, std::integral_constant<int, kVec>{}, std::false_type{});
      else if (warp_rows) f(x_tag, w_tag, std::integral_constant<int, 1>{}, std::true_type{});
      else f(x_tag, w_tag, std::integral_constant<int, 1>{}, std::false_type{});
    };
    if (w_type == at::kFloat) with_w(float{});
    else with_w(x_t{});
  };
  switch (x_type) {
    case at::kFloat: with_x(float{}); break;
    case at::kBFloat16: with_x(c10::BFloat16{}); break;
    case at::kHalf: with_x(c10::Half{}); break;
    default: RK_CHECK_ARG(false, "x", "expected dtype Float, BFloat16 or Half, got ", x_type);
  }
}

// 16-byte accesses need every row start (and the weight) 16-byte aligned and whole 16-byte words per row.
bool vector_aligned(std::initializer_list<const at::Tensor*> rows_of, int64_t cols, const at::Tensor& weight) {
  const int64_t per = 16 / rows_of.begin()[0]->element_size();
  if (cols % per != 0 || reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 != 0) return false;
  for (const at::Tensor* t : rows_of) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0 || t->stride(0) % per != 0) return false;
  }
  return true;
}

}  // namespace

void rms_norm_forward_out(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, double eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_norm(x.scalar_type(), weight.scalar_type(), vector_aligned({&x, &y}, cols, weight), cols,
                [&](auto x_tag, auto w_tag, auto n, auto warp_rows) {
    using x_t = decltype(x_tag);
    using w_t = decltype(w_tag);
    using L = RowLayout<warp_rows.value>;
    const int64_t blocks = (rows + L::kRowsPerBlock - 1) / L::kRowsPerBlock;
    launch_dependent(rms_norm_fwd_kernel<x_t, w_t, n.value, warp_rows.value>, dim3(static_cast<unsigned>(blocks)),
                     dim3(kThreads), 0, stream, x.data_ptr<x_t>(), weight.data_ptr<w_t>(), y.data_ptr<x_t>(), rows,
                     cols, y.stride(0), static_cast<float>(eps));
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_strided(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), cols = x.size(1);
  auto grad_x = at::empty_like(x);
  if (rows == 0 || cols == 0) return {grad_x, at::zeros_like(weight)};
  RK_CHECK_ARG(cols * sizeof(float) <= 96 * 1024, "x", "last dim ", cols,
               " exceeds the kernel's shared-memory limit (24576)");
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  dispatch_norm(x.scalar_type(), weight.scalar_type(), vector_aligned({&x, &grad_out, &grad_x}, cols, weight), cols,
                [&](auto x_tag, auto w_tag, auto n, auto warp_rows) {
    using x_t = decltype(x_tag);
    using w_t = decltype(w_tag);
    using L = RowLayout<warp_rows.value>;
    const int64_t groups = (rows + L::kRowsPerBlock - 1) / L::kRowsPerBlock;
    const int64_t blocks = std::min<int64_t>(groups, 4 * sms);
    const size_t smem = L::kRowsPerBlock * cols * sizeof(float);
    partial = at::empty({blocks, cols}, x.options().dtype(at::kFloat));
    auto kernel = rms_norm_bwd_kernel<x_t, w_t, n.value, warp_rows.value>;
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
