// The engine behind the log-prob ops: a [T, H] x [V, H]^T linear layer followed by a softmax over V,
// processed in chunks of tokens so that [T, V] logits never exist in device memory.
//
// Per chunk of rows: one cuBLAS GEMM writes the chunk's logits in fp32 (bf16 logits would put their
// rounding, up to |logit| * 2^-9, into every log-prob); one fused kernel per row computes the online
// log-sum-exp, log-prob and entropy, and (in the gradient modes) overwrites the logits in place with
// d(loss)/d(logits) in the inputs' dtype (row stride unchanged in bytes); two more GEMMs turn that into
// the chunk's grad_hidden rows (cuBLAS) and its contribution to grad_weight (accumulated in fp32 or in the
// weight's dtype, never re-read as logits; bf16 into fp32 on a CUTLASS kernel, sm90_gemm.cu).
// The statistics-only pass of bf16 inputs (token_logprobs' forward) needs no logits at all on Hopper: a
// CUTLASS GEMM reduces each output tile to per-token statistics in its epilogue (sm90_logits_stats.cu).
// The gradient passes of bf16 inputs keep bf16 logits instead, the statistics still exact: that GEMM also
// stores the tile rounded to bf16 (forward of a loss, Hopper), or the statistics were saved by the forward
// (backward of token_logprobs, a cuBLAS GEMM with bf16 out). d/d(logits) then sees the rounding the bf16
// eager reference has, and the chunks hold twice the rows.
#pragma once
#include <torch/types.h>

namespace ringkern::logprob {

// How the fused row kernel turns a token's log-prob into c_t = d(loss)/d(logp_t).
enum class CoefKind : int {
  kLinear = 0,  // c_t = -scale_t (weighted cross-entropy)
  kPolicy = 1,  // clipped policy surrogate: c_t = -scale_t * A_t * r_t unless clipped, r_t = exp(logp_t - old_t)
};

struct TokenCoef {
  CoefKind kind = CoefKind::kLinear;
  const float* scale = nullptr;      // [T] per-token weight (aggregation weight x correction), 0 = no gradient
  const float* old_logp = nullptr;   // [T] kPolicy only
  const float* advantage = nullptr;  // [T] kPolicy only
  float ratio_low = 0.f;             // 1 - eps_low
  float ratio_high = 0.f;            // 1 + eps_high
};

enum class RowMode : int {
  kStats = 0,         // log-prob, entropy and log-sum-exp only
  kStatsAndGrad = 1,  // the same, then d(loss)/d(logits) from the token coefficient (forward of a loss)
  kGrad = 2,          // d/d(logits) of grad_logp . logp + grad_entropy . entropy from saved lse/entropy
};

struct PassArgs {
  at::Tensor hidden;   // [T, H] fp32 or bf16
  at::Tensor weight;   // [V, H] same dtype
  at::Tensor targets;  // [T] int64, every value in [0, V)
  double temperature = 1.0;
  RowMode mode = RowMode::kStats;
  TokenCoef coef;                       // kStatsAndGrad
  at::Tensor grad_logp, grad_entropy;   // kGrad: [T] fp32
  at::Tensor logp, entropy, lse;        // [T] fp32; written by the stats modes, entropy and lse read by kGrad
  at::Tensor grad_hidden;               // [T, H] hidden's dtype, or undefined when not wanted
  at::Tensor grad_weight;               // [V, H] fp32 or weight's dtype, or undefined when not wanted
  bool accumulate_grad_weight = false;  // add to grad_weight's contents instead of overwriting them
};

// Runs the chunked pass described above; the gradient GEMMs run only in the gradient modes.
void run_chunked_pass(const PassArgs& args);

}  // namespace ringkern::logprob
