// Per-token softmax statistics of a linear layer's logits on Hopper without storing the logits: a CUTLASS 3
// GEMM whose epilogue reduces each output tile to per-row softmax statistics (see sm90_logits_stats.cu).
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ringkern::logprob {

// Per-token softmax statistics of z = (hidden @ weight^T) * inv_temp without storing z: logp[t] = z[t, targets[t]] -
// lse[t], entropy[t], lse[t] (all fp32 [T], device). hidden [T, H] bf16 contiguous, weight [V, H] bf16 contiguous,
// targets [T] int64 on the device (values already checked to lie in [0, V)). Runs on `stream`, syncs nothing with the
// host. Returns false, launching nothing, when this build has no CUTLASS or the shapes/alignments are unsupported
// (caller falls back); TORCH_CHECK-fails on CUTLASS errors.
//
// Environment (read per call; for measurements): RINGKERN_LOGPROB_STATS_TILE = "pingpong" (default) or
// "cooperative"; RINGKERN_LOGPROB_STATS_CHUNK_ROWS (tokens per GEMM, default 2048, at most 16384);
// RINGKERN_LOGPROB_STATS_RASTER = "m" (default), "n" or "auto". (The tile scheduler's swizzle stays 1: with 8,
// measured on an H200, the log-probs moved by up to 3e-3, so some tile's statistics went astray: not understood.)
bool token_stats_sm90(const at::Tensor& hidden, const at::Tensor& weight, const int64_t* targets, float inv_temp,
                      float* logp, float* entropy, float* lse, cudaStream_t stream);

}  // namespace ringkern::logprob
