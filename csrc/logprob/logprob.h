// Fused log-prob ops on CUDA: host entry points (schemas in csrc/ops.cpp). None of them materializes
// [T, V] logits; see chunked_softmax.h for how the work is chunked.
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>

namespace ringkern {

// (logp [T], entropy [T], lse [T]) of softmax(hidden @ weight^T / temperature), fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const at::Tensor& targets, double temperature);

// (grad_hidden, grad_weight) of grad_logp . logp + grad_entropy . entropy; each is empty ([0]) unless asked for.
std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cuda(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    bool need_grad_hidden, bool need_grad_weight);

// (loss [], metrics [8], grad_hidden, grad_weight) of the IcePop / TIS / plain clipped policy loss; the
// gradients are those of the loss itself (upstream gradient 1). grad_weight is empty when it went into
// grad_weight_acc (fp32 [V, H], added to) or was not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> icepop_policy_loss_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& old_logprobs,
    const at::Tensor& rollout_logprobs, const at::Tensor& advantages, const at::Tensor& loss_mask,
    const at::Tensor& cu_seqlens, double alpha, double beta, double eps_low, double eps_high, double temperature,
    c10::string_view correction, c10::string_view aggregation, double tis_cap, bool need_grad_hidden,
    bool need_grad_weight, const std::optional<at::Tensor>& grad_weight_acc);

// (loss [], grad_hidden, grad_weight) of the weighted cross-entropy with reduction "sum" or "mean".
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    const std::optional<at::Tensor>& token_weights, c10::string_view reduction, bool need_grad_hidden,
    bool need_grad_weight, const std::optional<at::Tensor>& grad_weight_acc);

}  // namespace ringkern
