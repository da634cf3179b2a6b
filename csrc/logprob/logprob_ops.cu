// Host entry points of the fused log-prob ops: argument checks, the per-token coefficients of each loss
// (ATen on [T] vectors), one chunked pass, and the loss and metrics from the per-token log-probs.
#include "logprob.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/check.h"
#include "chunked_softmax.h"

namespace ringkern {
namespace {

using logprob::CoefKind;
using logprob::PassArgs;
using logprob::RowMode;

void check_linear(const at::Tensor& hidden, const at::Tensor& weight) {
  check_cuda(hidden, "hidden");
  check_dtype(hidden, "hidden", {at::kFloat, at::kBFloat16});
  RK_CHECK_ARG(hidden.dim() == 2, "hidden", "expected shape [T, H], got ", hidden.sizes());
  RK_CHECK_ARG(hidden.size(1) > 0, "hidden", "expected H > 0, got shape ", hidden.sizes());
  check_contiguous(hidden, "hidden");
  check_same_device(weight, hidden, "weight");
  RK_CHECK_ARG(weight.scalar_type() == hidden.scalar_type(), "weight", "expected dtype ", hidden.scalar_type(),
               " (hidden's), got ", weight.scalar_type());
  RK_CHECK_ARG(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) > 0, "weight",
               "expected shape [V, ", hidden.size(1), "] with V > 0, got ", weight.sizes());
  check_contiguous(weight, "weight");
}

// A [T] per-token tensor of one of the given dtypes on hidden's device.
void check_tokens(const at::Tensor& t, const char* name, const at::Tensor& hidden,
                  std::initializer_list<at::ScalarType> dtypes) {
  check_same_device(t, hidden, name);
  check_dtype(t, name, dtypes);
  RK_CHECK_ARG(t.dim() == 1 && t.size(0) == hidden.size(0), name, "expected shape [", hidden.size(0),
               "] (hidden's T), got ", t.sizes());
  check_contiguous(t, name);
}

void check_temperature(double temperature) {
  RK_CHECK_ARG(temperature > 0.0 && std::isfinite(temperature), "temperature", "expected a finite value > 0, got ",
               temperature);
}

// grad_weight_acc: fp32 [V, H] on weight's device.
void check_accumulator(const std::optional<at::Tensor>& acc, const at::Tensor& weight) {
  if (!acc.has_value()) return;
  check_same_device(*acc, weight, "grad_weight_acc");
  check_dtype(*acc, "grad_weight_acc", {at::kFloat});
  RK_CHECK_ARG(acc->sizes() == weight.sizes(), "grad_weight_acc", "expected shape ", weight.sizes(),
               " (weight's), got ", acc->sizes());
  check_contiguous(*acc, "grad_weight_acc");
}

// Value checks that need the data: one device-to-host copy for all of them.
// Targets must lie in [0, V) unless equal to ignore_index; cu_seqlens must run from 0 to T, non-decreasing.
void check_values(const at::Tensor& targets, int64_t vocab, std::optional<int64_t> ignore_index,
                  const at::Tensor* cu_seqlens) {
  auto bad_target = (targets < 0) | (targets >= vocab);
  if (ignore_index.has_value()) bad_target = bad_target & (targets != *ignore_index);
  std::vector<at::Tensor> flags{bad_target.any()};
  if (cu_seqlens != nullptr) {
    const auto cu = cu_seqlens->to(at::kLong);
    const int64_t n = cu.size(0);
    flags.push_back((cu[0] != 0) | (cu[n - 1] != targets.size(0)) | (cu.diff() < 0).any());
  }
  const auto host = at::stack(flags).cpu();
  const bool* bad = host.data_ptr<bool>();
  RK_CHECK_ARG(!bad[0], "targets", "expected every value in [0, ", vocab, ")",
               ignore_index ? " or equal to ignore_index" : "");
  if (cu_seqlens != nullptr) {
    RK_CHECK_ARG(!bad[1], "cu_seqlens", "expected non-decreasing offsets from 0 to T = ", targets.size(0));
  }
}

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The pass's gradient outputs: grad_hidden, and grad_weight in fp32 (the accumulator, a caller's buffer
// or fp32 weights) or nothing. Returns the tensor to hand back as grad_weight (empty when not asked for
// or when it went into the caller's buffer).
struct GradOutputs {
  at::Tensor grad_hidden, grad_weight;
};

GradOutputs prepare_grads(PassArgs& pass, bool need_grad_hidden, bool need_grad_weight,
                          const std::optional<at::Tensor>& acc) {
  GradOutputs out{need_grad_hidden ? at::empty_like(pass.hidden) : empty_grad(pass.hidden),
                  empty_grad(pass.weight)};
  if (need_grad_hidden) pass.grad_hidden = out.grad_hidden;
  if (!need_grad_weight) return out;
  if (acc.has_value()) {
    pass.grad_weight = *acc;
    pass.accumulate_grad_weight = true;
  } else {
    pass.grad_weight = at::empty_like(pass.weight, pass.weight.options().dtype(at::kFloat));
  }
  return out;
}

// Converts the fp32 accumulator into the weight's dtype after the pass (no-op for the caller's buffer).
void finish_grads(const PassArgs& pass, GradOutputs& out, const std::optional<at::Tensor>& acc) {
  if (pass.grad_weight.defined() && !acc.has_value()) out.grad_weight = pass.grad_weight.to(pass.weight.scalar_type());
}

PassArgs make_pass(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                   double temperature, RowMode mode) {
  PassArgs pass;
  pass.hidden = hidden;
  pass.weight = weight;
  pass.targets = targets;
  pass.temperature = temperature;
  pass.mode = mode;
  if (mode != RowMode::kGrad) {
    const auto f32 = hidden.options().dtype(at::kFloat);
    pass.logp = at::empty({hidden.size(0)}, f32);
    pass.entropy = at::empty({hidden.size(0)}, f32);
    pass.lse = at::empty({hidden.size(0)}, f32);
  }
  return pass;
}

// Per-token aggregation weights w_t (0 off the loss mask): 1 / n_tokens for "token-mean"; for
// "seq-mean-token-mean" 1 / (tokens of t's sequence x sequences with loss tokens). Never divides by 0.
at::Tensor aggregation_weights(const at::Tensor& mask, const at::Tensor& cu_seqlens, c10::string_view aggregation) {
  const auto maskf = mask.to(at::kFloat);
  if (aggregation == "token-mean") return maskf / maskf.sum().clamp_min(1);
  const int64_t tokens = mask.size(0);
  if (tokens == 0) return maskf;
  const auto cu = cu_seqlens.to(at::kLong);
  const auto cum = at::cat({at::zeros({1}, cu.options()), mask.to(at::kLong).cumsum(0)});  // [T + 1]
  const auto seq_tokens = (cum.index_select(0, cu.slice(0, 1)) - cum.index_select(0, cu.slice(0, 0, -1)));
  const auto n_seqs = (seq_tokens > 0).sum().clamp_min(1).to(at::kFloat);
  const auto seq_of_token = at::searchsorted(cu.slice(0, 1), at::arange(tokens, cu.options()), false, true);
  const auto per_token = seq_tokens.index_select(0, seq_of_token).clamp_min(1).to(at::kFloat);
  return maskf / (per_token * n_seqs);
}

// Train/inference correction weight of each token from k = exp(old - rollout).
at::Tensor correction_weights(const at::Tensor& k, c10::string_view correction, double alpha, double beta,
                              double tis_cap) {
  if (correction == "icepop") return at::where((k >= alpha) & (k <= beta), k, at::zeros_like(k));
  if (correction == "tis") return k.clamp_max(tis_cap);
  return at::ones_like(k);
}

void check_mode_names(c10::string_view correction, c10::string_view aggregation) {
  RK_CHECK_ARG(correction == "icepop" || correction == "tis" || correction == "none", "correction",
               "expected 'icepop', 'tis' or 'none', got '", std::string(correction.data(), correction.size()),
               "'");
  RK_CHECK_ARG(aggregation == "seq-mean-token-mean" || aggregation == "token-mean", "aggregation",
               "expected 'seq-mean-token-mean' or 'token-mean', got '",
               std::string(aggregation.data(), aggregation.size()), "'");
}

// The eight metrics, in the order of ringkern.ops.ICEPOP_METRICS.
at::Tensor icepop_metrics(const at::Tensor& mask, const at::Tensor& old, const at::Tensor& rollout,
                          const at::Tensor& log_k, const at::Tensor& k, const at::Tensor& clipped,
                          const at::Tensor& entropy, double alpha, double beta) {
  const auto zero = at::zeros_like(k);
  const auto n_tokens = mask.sum().to(at::kFloat);
  const auto denom = n_tokens.clamp_min(1);
  auto masked_mean = [&](const at::Tensor& v) { return at::where(mask, v.to(at::kFloat), zero).sum() / denom; };
  const auto prob_gap = at::where(mask, (old.exp() - rollout.exp()).abs(), zero);
  return at::stack({
      masked_mean(k < alpha),
      masked_mean(k > beta),
      masked_mean(log_k.abs()),
      at::cat({prob_gap, at::zeros({1}, k.options())}).max(),
      masked_mean(k * log_k - (k - 1)),  // k3 estimate of KL(train || infer)
      masked_mean(clipped),
      masked_mean(entropy),
      n_tokens,
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const at::Tensor& targets, double temperature) {
  check_linear(hidden, weight);
  check_tokens(targets, "targets", hidden, {at::kLong});
  check_temperature(temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_values(targets, weight.size(0), std::nullopt, nullptr);
  auto pass = make_pass(hidden, weight, targets, temperature, RowMode::kStats);
  logprob::run_chunked_pass(pass);
  return {pass.logp, pass.entropy, pass.lse};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cuda(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    bool need_grad_hidden, bool need_grad_weight) {
  check_linear(hidden, weight);
  check_tokens(targets, "targets", hidden, {at::kLong});
  check_tokens(grad_logp, "grad_logp", hidden, {at::kFloat});
  check_tokens(grad_entropy, "grad_entropy", hidden, {at::kFloat});
  check_tokens(lse, "lse", hidden, {at::kFloat});
  check_tokens(entropy, "entropy", hidden, {at::kFloat});
  check_temperature(temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_values(targets, weight.size(0), std::nullopt, nullptr);
  auto pass = make_pass(hidden, weight, targets, temperature, RowMode::kGrad);
  pass.grad_logp = grad_logp;
  pass.grad_entropy = grad_entropy;
  pass.lse = lse;
  pass.entropy = entropy;
  auto grads = prepare_grads(pass, need_grad_hidden, need_grad_weight, std::nullopt);
  if (need_grad_hidden || need_grad_weight) logprob::run_chunked_pass(pass);
  finish_grads(pass, grads, std::nullopt);
  return {grads.grad_hidden, grads.grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> icepop_policy_loss_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& old_logprobs,
    const at::Tensor& rollout_logprobs, const at::Tensor& advantages, const at::Tensor& loss_mask,
    const at::Tensor& cu_seqlens, double alpha, double beta, double eps_low, double eps_high, double temperature,
    c10::string_view correction, c10::string_view aggregation, double tis_cap, bool need_grad_hidden,
    bool need_grad_weight, const std::optional<at::Tensor>& grad_weight_acc) {
  check_linear(hidden, weight);
  check_tokens(targets, "targets", hidden, {at::kLong});
  check_tokens(old_logprobs, "old_logprobs", hidden, {at::kFloat});
  check_tokens(rollout_logprobs, "rollout_logprobs", hidden, {at::kFloat});
  check_tokens(advantages, "advantages", hidden, {at::kFloat});
  check_tokens(loss_mask, "loss_mask", hidden, {at::kBool});
  check_same_device(cu_seqlens, hidden, "cu_seqlens");
  check_dtype(cu_seqlens, "cu_seqlens", {at::kInt, at::kLong});
  RK_CHECK_ARG(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, "cu_seqlens", "expected shape [B + 1], got ",
               cu_seqlens.sizes());
  check_contiguous(cu_seqlens, "cu_seqlens");
  check_temperature(temperature);
  check_mode_names(correction, aggregation);
  check_accumulator(grad_weight_acc, weight);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_values(targets, weight.size(0), std::nullopt, &cu_seqlens);

  const auto log_k = old_logprobs - rollout_logprobs;
  const auto k = log_k.exp();
  const auto scale = aggregation_weights(loss_mask, cu_seqlens, aggregation) *
                     correction_weights(k, correction, alpha, beta, tis_cap);
  auto pass = make_pass(hidden, weight, targets, temperature, RowMode::kStatsAndGrad);
  pass.coef = {CoefKind::kPolicy, scale.data_ptr<float>(), old_logprobs.data_ptr<float>(),
               advantages.data_ptr<float>(), static_cast<float>(1.0 - eps_low), static_cast<float>(1.0 + eps_high)};
  auto grads = prepare_grads(pass, need_grad_hidden, need_grad_weight, grad_weight_acc);
  logprob::run_chunked_pass(pass);
  finish_grads(pass, grads, grad_weight_acc);

  const auto ratio = (pass.logp - old_logprobs).exp();
  const auto surrogate =
      at::minimum(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages);
  const auto loss = -at::where(loss_mask, scale * surrogate, at::zeros_like(surrogate)).sum();
  const auto clipped = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - eps_low) & (advantages < 0));
  auto metrics =
      icepop_metrics(loss_mask, old_logprobs, rollout_logprobs, log_k, k, clipped, pass.entropy, alpha, beta);
  return {loss, metrics, grads.grad_hidden, grads.grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    const std::optional<at::Tensor>& token_weights, c10::string_view reduction, bool need_grad_hidden,
    bool need_grad_weight, const std::optional<at::Tensor>& grad_weight_acc) {
  check_linear(hidden, weight);
  check_tokens(targets, "targets", hidden, {at::kLong});
  if (token_weights.has_value()) check_tokens(*token_weights, "token_weights", hidden, {at::kFloat});
  RK_CHECK_ARG(reduction == "sum" || reduction == "mean", "reduction", "expected 'sum' or 'mean', got '",
               std::string(reduction.data(), reduction.size()), "'");
  check_accumulator(grad_weight_acc, weight);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_values(targets, weight.size(0), ignore_index, nullptr);

  const auto valid = targets != ignore_index;
  const auto safe_targets = at::where(valid, targets, at::zeros_like(targets));
  auto scale = token_weights.has_value() ? at::where(valid, *token_weights, at::zeros_like(*token_weights))
                                         : valid.to(at::kFloat);
  if (reduction == "mean") scale = scale / scale.sum().clamp_min(std::numeric_limits<float>::min());
  auto pass = make_pass(hidden, weight, safe_targets, 1.0, RowMode::kStatsAndGrad);
  pass.coef = {CoefKind::kLinear, scale.data_ptr<float>(), nullptr, nullptr, 0.f, 0.f};
  auto grads = prepare_grads(pass, need_grad_hidden, need_grad_weight, grad_weight_acc);
  logprob::run_chunked_pass(pass);
  finish_grads(pass, grads, grad_weight_acc);
  const auto loss = -(scale * pass.logp).sum();
  return {loss, grads.grad_hidden, grads.grad_weight};
}

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("icepop_policy_loss", &icepop_policy_loss_cuda);
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
}

}  // namespace ringkern
