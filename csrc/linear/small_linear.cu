// y = x @ weight^T (+ residual) for decode-sized x: the dense projections of the cached decode step (fused QKV,
// the attention output with the residual added, the dense layers' MLP). At a few rows the GEMM is bound by
// reading the weight once; cuBLAS's GEMV-shaped kernels for these shapes add a split-K reduction and a
// separate residual add. Here one launch streams the weight with the few-rows tensor-core blocks of
// csrc/common/few_rows.h (16 output columns per block, K split over its warps, fixed-order sums:
// deterministic) and adds the residual in fp32 before the one rounding to bf16. A programmatic dependent launch
// (csrc/common/pdl.h): the first weight chunks are on their way before the input is ready.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include "../common/check.h"
#include "../common/few_rows.h"
#include "../common/pdl.h"

namespace ringkern {
namespace {

using few_rows::bf16;
using few_rows::kMmaRows;
using few_rows::kMmaWarps;

constexpr int kMaxRows = 32;  // rows of one pass (4 n-tiles of 8); more rows would read the weight again

// grid (N / 16): block b computes columns 16 b .. 16 b + 15 of every row.
template <int kNT>
__global__ void __launch_bounds__(kMmaWarps * 32)
small_linear_kernel(const bf16* __restrict__ x, const bf16* __restrict__ weight, const bf16* __restrict__ residual,
                    bf16* __restrict__ y, int T, int K, int N) {
  __shared__ float red[(kMmaWarps - 1) * kNT * 4 * 32];
  const int n0 = blockIdx.x * kMmaRows;
  allow_next_grid();
  few_rows::prefetch_first_chunks(weight + static_cast<int64_t>(n0) * K, K, kMmaRows, K);
  wait_for_previous_grid();
  few_rows::rows_pass<kNT>(x, weight + static_cast<int64_t>(n0) * K, residual, y, red, 0, T, N, K, n0);
}

at::Tensor small_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  check_cuda(x, "x");
  check_dtype(x, "x", {at::kBFloat16});
  check_contiguous(x, "x");
  RK_CHECK_ARG(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, "x", "expected [T, K] with 1 <= T <= ",
               kMaxRows, ", got ", x.sizes());
  const int64_t T = x.size(0), K = x.size(1);
  RK_CHECK_ARG(K % (32 * kMmaWarps) == 0, "x", "expected K to be a multiple of ", 32 * kMmaWarps, ", got ", K);
  check_same_device(weight, x, "weight");
  check_dtype(weight, "weight", {at::kBFloat16});
  check_contiguous(weight, "weight");
  RK_CHECK_ARG(weight.dim() == 2 && weight.size(1) == K && weight.size(0) % kMmaRows == 0 && weight.size(0) > 0,
               "weight", "expected [N, ", K, "] with N a positive multiple of ", kMmaRows, ", got ", weight.sizes());
  const int64_t N = weight.size(0);
  RK_CHECK_ARG(N <= INT32_MAX / kMaxRows && K <= INT32_MAX, "weight", "too large: ", weight.sizes());
  if (residual.has_value()) {
    check_same_device(*residual, x, "residual");
    check_dtype(*residual, "residual", {at::kBFloat16});
    check_contiguous(*residual, "residual");
    RK_CHECK_ARG(residual->dim() == 2 && residual->size(0) == T && residual->size(1) == N, "residual",
                 "expected [", T, ", ", N, "], got ", residual->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({T, N}, x.options());
  const auto* res = residual.has_value() ? reinterpret_cast<const bf16*>(residual->data_ptr()) : nullptr;
  auto launch = [&](auto kernel) {
    launch_dependent(kernel, dim3(static_cast<unsigned>(N / kMmaRows)), dim3(kMmaWarps * 32), 0,
                     at::cuda::getCurrentCUDAStream(), reinterpret_cast<const bf16*>(x.data_ptr()),
                     reinterpret_cast<const bf16*>(weight.data_ptr()), res, reinterpret_cast<bf16*>(y.data_ptr()),
                     static_cast<int>(T), static_cast<int>(K), static_cast<int>(N));
  };
  if (T <= 8) launch(small_linear_kernel<1>);
  else if (T <= 16) launch(small_linear_kernel<2>);
  else launch(small_linear_kernel<4>);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) { m.impl("small_linear", &small_linear_cuda); }

}  // namespace ringkern
