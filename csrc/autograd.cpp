// Autograd kernels of the per-layer ops (rms_norm, router_logits, moe_route, moe_experts_forward,
// mtp_input), in C++ so that a differentiable call costs a few microseconds of host time: the same
// formulas through torch.library's Python autograd cost ~40-90 us per call, which an eager decode step or
// a small training step pays at every layer. Each forward calls the op below autograd (the CUDA kernel or
// the CPU reference registered from Python) and its backward calls the op's *_backward schema.
// The loss ops (token_logprobs, attach_grads), called once per step, keep their formulas in Python
// (ringkern/ops/_library.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace ringkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct RmsNorm : torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    static auto fwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("ringkern::rms_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    return fwd.call(x, weight, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             double)>("ringkern::rms_norm_backward");
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_w] = bwd.call(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["eps"].toDouble());
    return {grad_x, grad_w, at::Tensor()};
  }
};

// fp32 logits of x [N, H] and the router weight [E, H]; gradients in the inputs' dtypes.
struct RouterLogits : torch::autograd::Function<RouterLogits> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight) {
    static auto fwd = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("ringkern::router_logits");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    return fwd.call(x, weight);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1], &grad = grads[0];
    at::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(grad, weight.to(at::kFloat)).to(x.scalar_type());
    if (ctx->needs_input_grad(1)) grad_w = at::matmul(grad.t(), x.to(at::kFloat)).to(weight.scalar_type());
    return {grad_x, grad_w};
  }
};

// (weights, expert_ids, tokens_per_expert); only the weights are differentiable (w.r.t. router_logits).
struct MoeRoute : torch::autograd::Function<MoeRoute> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& router_logits, const at::Tensor& expert_bias,
                               int64_t n_group, int64_t topk_group, int64_t top_k, double scale, bool renormalize,
                               const std::optional<at::Tensor>& expert_ids) {
    static auto fwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double, bool,
        const std::optional<at::Tensor>&)>("ringkern::moe_route");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, ids, counts] =
        fwd.call(router_logits, expert_bias, n_group, topk_group, top_k, scale, renormalize, expert_ids);
    ctx->save_for_backward({router_logits, ids});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["renormalize"] = renormalize;
    ctx->mark_non_differentiable({ids, counts});
    return {weights, ids, counts};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>(
        "ringkern::moe_route_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      grad_logits = bwd.call(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["scale"].toDouble(),
                             ctx->saved_data["renormalize"].toBool());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// (y, then gate_up_out and the dispatch, kept for the backward and not differentiable).
struct MoeExperts : torch::autograd::Function<MoeExperts> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weights,
                               const at::Tensor& expert_ids, const at::Tensor& gate_up_proj,
                               const at::Tensor& down_proj, bool atomic_combine) {
    static auto fwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>(
        "ringkern::moe_experts_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, gate_up_out, sorted_slot, slot_pos, offsets] =
        fwd.call(x, weights, expert_ids, gate_up_proj, down_proj, atomic_combine);
    ctx->save_for_backward({x, weights, gate_up_proj, down_proj, gate_up_out, sorted_slot, slot_pos, offsets});
    ctx->mark_non_differentiable({gate_up_out, sorted_slot, slot_pos, offsets});
    return {y, gate_up_out, sorted_slot, slot_pos, offsets};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>("ringkern::moe_experts_backward");
    if (!grads[0].defined()) return variable_list(6);
    const auto s = ctx->get_saved_variables();
    auto [grad_x, grad_w, grad_gate_up, grad_down] =
        bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    auto keep = [&](int i, at::Tensor g) { return ctx->needs_input_grad(i) ? g : at::Tensor(); };
    return {keep(0, grad_x), keep(1, grad_w), at::Tensor(), keep(3, grad_gate_up), keep(4, grad_down), at::Tensor()};
  }
};

// (out, normed: the GEMM operand kept for the backward, not differentiable).
struct MtpInput : torch::autograd::Function<MtpInput> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& embeds, const at::Tensor& hidden,
                               const at::Tensor& enorm_weight, const at::Tensor& hnorm_weight,
                               const at::Tensor& eh_weight, double eps) {
    static auto fwd = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&, double)>(
        "ringkern::mtp_input");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, normed] = fwd.call(embeds, hidden, enorm_weight, hnorm_weight, eh_weight, eps);
    ctx->save_for_backward({embeds, hidden, normed, enorm_weight, hnorm_weight, eh_weight});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({normed});
    return {out, normed};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, double)>("ringkern::mtp_input_backward");
    const auto s = ctx->get_saved_variables();
    auto [ge, gh, gen, ghn, gw] =
        bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["eps"].toDouble());
    return {ge, gh, gen, ghn, gw, at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RmsNorm::apply(x, weight, eps);
}

at::Tensor router_logits_autograd(const at::Tensor& x, const at::Tensor& weight) {
  return RouterLogits::apply(x, weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_autograd(const at::Tensor& router_logits,
                                                                  const at::Tensor& expert_bias, int64_t n_group,
                                                                  int64_t topk_group, int64_t top_k, double scale,
                                                                  bool renormalize,
                                                                  const std::optional<at::Tensor>& expert_ids) {
  auto out = MoeRoute::apply(router_logits, expert_bias, n_group, topk_group, top_k, scale, renormalize, expert_ids);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_autograd(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, bool atomic_combine) {
  auto out = MoeExperts::apply(x, weights, expert_ids, gate_up_proj, down_proj, atomic_combine);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor> mtp_input_autograd(const at::Tensor& embeds, const at::Tensor& hidden,
                                                      const at::Tensor& enorm_weight, const at::Tensor& hnorm_weight,
                                                      const at::Tensor& eh_weight, double eps) {
  auto out = MtpInput::apply(embeds, hidden, enorm_weight, hnorm_weight, eh_weight, eps);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("router_logits", &router_logits_autograd);
  m.impl("moe_route", &moe_route_autograd);
  m.impl("moe_experts_forward", &moe_experts_autograd);
  m.impl("mtp_input", &mtp_input_autograd);
}

}  // namespace ringkern
