// Per-token softmax statistics of a linear layer's logits on Hopper without storing the logits: a CUTLASS 3
// GEMM whose epilogue reduces each output tile to per-row softmax statistics (see sm90_logits_stats.cu).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ringkern::logprob {

// Whether token_stats_sm90 takes these inputs: bf16 contiguous [T, H] and [V, H] on one device, 16-byte aligned,
// H % 8 == 0, inv_temp > 0 and finite, an sm_90 GPU, and a build with CUTLASS.
bool stats_gemm_applies(const at::Tensor& hidden, const at::Tensor& weight, float inv_temp);

// Per-token softmax statistics of z = (hidden @ weight^T) * inv_temp without storing z: logp[t] = z[t, targets[t]] -
// lse[t], entropy[t], lse[t] (all fp32 [T], device). hidden [T, H] bf16 contiguous, weight [V, H] bf16 contiguous,
// targets [T] int64 on the device (values already checked to lie in [0, V)). With `logits` (device, [T, ld] bf16,
// ld >= V and even) the GEMM also stores hidden @ weight^T (unscaled) there, rounded to bf16. Runs on `stream`,
// syncs nothing with the host. Returns false, launching nothing, when stats_gemm_applies() is false or CUTLASS
// declines the shapes (caller falls back); TORCH_CHECK-fails on CUTLASS errors.
//
// Environment (read per call; for measurements): RINGKERN_LOGPROB_STATS_TILE = "pingpong" (default) or
// "cooperative"; RINGKERN_LOGPROB_STATS_CHUNK_ROWS (tokens per GEMM, default 2048, at most 16384);
// RINGKERN_LOGPROB_STATS_RASTER = "m" (default), "n" or "auto". (The tile scheduler's swizzle stays 1: with 8,
// measured on an H200, the log-probs moved by up to 3e-3, so some tile's statistics went astray: not understood.)
bool token_stats_sm90(const at::Tensor& hidden, const at::Tensor& weight, const int64_t* targets, float inv_temp,
                      float* logp, float* entropy, float* lse, cudaStream_t stream,
                      c10::BFloat16* logits = nullptr, int64_t ld = 0);

}  // namespace ringkern::logprob
