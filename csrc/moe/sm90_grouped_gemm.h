// Grouped (per-expert) GEMMs of the routed experts on Hopper, with CUTLASS 3 (see sm90_grouped_gemm.cu).
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

namespace ringkern::moe {

// Rows of x_sorted [S, H] bf16 are grouped by expert: expert e owns [offsets[e-1], offsets[e]) (offsets [E]
// int32 on the device, cumulative ends, offsets[E-1] = S; groups may be empty). Both calls read offsets only
// on the device (no host sync, CUDA-graph capturable) and run on `stream`. Outputs are preallocated.
//
// Each returns false, having launched nothing, when this build has no CUTLASS or the shapes, strides or
// alignments are not supported (the caller then falls back); TORCH_CHECK-fails on CUTLASS errors.

// gate_up_out [S, 2I] = x_sorted @ w_gu[e]^T per expert (w_gu [E, 2I, H], gate and up rows interleaved:
// row 2i is gate_i, row 2i+1 is up_i), rounded to bf16 from the fp32 accumulators; act [S, I] =
// silu(gate) * up, computed in fp32 from the same accumulators.
bool grouped_gate_up_swiglu_sm90(const at::Tensor& x_sorted, const at::Tensor& w_gu, const at::Tensor& offsets,
                                 at::Tensor& gate_up_out, at::Tensor& act, cudaStream_t stream);

// y_sorted [S, H] = bf16(row_scale[p] * (act @ w_down[e]^T)[p]) per expert (act [S, I], w_down [E, H, I]);
// row_scale [S] fp32 on the device, or nullptr for a plain store.
bool grouped_down_sm90(const at::Tensor& act, const at::Tensor& w_down, const at::Tensor& offsets,
                       const float* row_scale /* [S] or nullptr */, at::Tensor& y_sorted, cudaStream_t stream);

// The same GEMM with the combine fused (an explicit opt-in: not bitwise reproducible): instead of storing
// y_sorted, each row p adds row_scale[p] * (act @ w_down[e]^T)[p] into y32 [T, H] fp32 (zeroed by the caller)
// at token sorted_slot[p] / k with fp32 atomics.
bool grouped_down_combine_sm90(const at::Tensor& act, const at::Tensor& w_down, const at::Tensor& offsets,
                               const float* row_scale, const int32_t* sorted_slot, int k, at::Tensor& y32,
                               cudaStream_t stream);

}  // namespace ringkern::moe
