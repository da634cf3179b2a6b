// The two bf16 x bf16 -> fp32-output GEMMs of the chunked pass on Hopper: CUTLASS 3 warp-specialized
// ping-pong kernels (TMA loads, wgmma; two consumer warp groups take alternate output tiles, so one
// group's fp32 epilogue overlaps the other's main loop). cuBLAS's cooperative kernels leave that epilogue
// exposed: measured on an H200 at T=16384, H=4096, V=157184 (8 chunks of 2048 rows), the eight
// weight-gradient GEMMs (reading and writing the fp32 [V, H] accumulator) took 39.5 ms (534 TFLOP/s) and
// the eight fp32 logits GEMMs 33.0 ms, against 31.2 ms for the bf16 grad_hidden GEMMs.
#include "sm90_gemm.h"

#if defined(RINGKERN_WITH_CUTLASS)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>

#include <map>
#include <mutex>

// CUTLASS's device code without assert(): a call to the assert handler inside the kernel splits its wgmma
// pipeline (ptxas C7510: the wgmma instructions are then serialized).
#ifndef NDEBUG
#define NDEBUG
#include <cassert>
#endif
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.hpp>
#endif

namespace ringkern::logprob {

#if defined(RINGKERN_WITH_CUTLASS)
namespace {

using namespace cute;
using Bf16 = cutlass::bfloat16_t;
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_2, _1, _1>;

// A ping-pong GEMM D = A B (+ beta C) with bf16 operands in layouts LayoutA, LayoutB (set by the including
// namespace) and fp32 C, D row-major. Written out per GEMM: g++ cannot parse the builders' nested
// dependent types inside a class template.
#define RINGKERN_PINGPONG_GEMM                                                                                      \
  using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<                                               \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,                                \
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, float, cutlass::layout::RowMajor, 4, float,   \
      cutlass::layout::RowMajor, 4, cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;                          \
  using Mainloop = cutlass::gemm::collective::CollectiveBuilder<                                                   \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, LayoutA, 8, Bf16, LayoutB, 8, float, TileShape,   \
      ClusterShape,                                                                                                \
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,        \
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;                                              \
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;              \
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

namespace logits {  // logits [rows, V] = hidden [rows, H] (K-major) x weight^T (weight [V, H]: K-major)
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
RINGKERN_PINGPONG_GEMM
}  // namespace logits

namespace grad_weight {  // grad_weight [V, H] = d^T (d [rows, V]: M-major) x hidden [rows, H] (N-major)
using LayoutA = cutlass::layout::ColumnMajor;
using LayoutB = cutlass::layout::RowMajor;
RINGKERN_PINGPONG_GEMM
}  // namespace grad_weight
#undef RINGKERN_PINGPONG_GEMM

int sm_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it == counts.end()) {
    it = counts.emplace(device, cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device)).first;
  }
  return it->second;
}

// Runs one GEMM; false when CUTLASS cannot take the arguments.
template <typename Gemm>
bool run(typename Gemm::Arguments& args, cutlass::gemm::kernel::detail::RasterOrderOptions raster,
         cudaStream_t stream) {
  const int device = c10::cuda::current_device();
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count(device);
  args.scheduler.raster_order = raster;
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)},
                          at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  }
  TORCH_CHECK(gemm.initialize(args, workspace_bytes ? workspace.data_ptr() : nullptr, stream) ==
                  cutlass::Status::kSuccess,
              "ringkern: CUTLASS GEMM: initialize failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "ringkern: CUTLASS GEMM: launch failed");
  return true;
}

bool fits_int(int64_t a, int64_t b, int64_t c) { return a <= INT32_MAX && b <= INT32_MAX && c <= INT32_MAX; }

}  // namespace
#endif

bool logits_gemm_sm90(const c10::BFloat16* hidden, const c10::BFloat16* weight, int64_t rows, int64_t H, int64_t V,
                      float* logits, int64_t ld, cudaStream_t stream) {
#if !defined(RINGKERN_WITH_CUTLASS)
  return false;
#else
  if (!fits_int(rows, H, V)) return false;
  const auto stride_a = make_stride(H, Int<1>{}, int64_t{0});
  const auto stride_b = make_stride(H, Int<1>{}, int64_t{0});
  const auto stride_c = make_stride(ld, Int<1>{}, int64_t{0});
  typename logits::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(rows), static_cast<int>(V), static_cast<int>(H), 1},
      {reinterpret_cast<const Bf16*>(hidden), stride_a, reinterpret_cast<const Bf16*>(weight), stride_b},
      {{1.f, 0.f}, logits, stride_c, logits, stride_c}};
  // Consecutive tiles walk along M (the chunk's rows) first: they share their weight rows, read once from
  // memory, while the chunk's hidden rows (rows x H bf16) stay in L2.
  return run<logits::Gemm>(args, cutlass::gemm::kernel::detail::RasterOrderOptions::AlongM, stream);
#endif
}

bool grad_weight_gemm_sm90(const c10::BFloat16* hidden, const c10::BFloat16* d, int64_t rows, int64_t ld_d,
                           int64_t H, int64_t V, float beta, float* grad_weight, cudaStream_t stream) {
#if !defined(RINGKERN_WITH_CUTLASS)
  return false;
#else
  if (!fits_int(rows, H, V)) return false;
  const auto stride_a = make_stride(Int<1>{}, ld_d, int64_t{0});
  const auto stride_b = make_stride(Int<1>{}, H, int64_t{0});
  const auto stride_c = make_stride(H, Int<1>{}, int64_t{0});
  typename grad_weight::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(V), static_cast<int>(H), static_cast<int>(rows), 1},
      {reinterpret_cast<const Bf16*>(d), stride_a, reinterpret_cast<const Bf16*>(hidden), stride_b},
      {{1.f, beta}, grad_weight, stride_c, grad_weight, stride_c}};
  // Consecutive tiles walk along N (H) first: they share their d^T rows, read once from memory, while
  // hidden's chunk (rows x H bf16) stays in L2.
  return run<grad_weight::Gemm>(args, cutlass::gemm::kernel::detail::RasterOrderOptions::AlongN, stream);
#endif
}

}  // namespace ringkern::logprob
