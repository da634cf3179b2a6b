// MoE routing, dispatch and routed-expert compute: host entry points of the CUDA kernels.
//
// Shape legend: T tokens, E experts, k experts per token, S = T*k token slots (slot = t*k + j),
// H hidden size, I expert intermediate size.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

namespace ringkern {

// Fused sigmoid group-limited router (see ringkern.ops.reference.moe_route for the contract).
// router_logits [T, E] fp32, expert_bias [E] fp32, expert_ids [T, k] int32/int64 (replay) or none.
// Returns (weights [T, k] fp32, expert_ids [T, k] int32, tokens_per_expert [E] int32). No host sync.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& router_logits,
                                                              const at::Tensor& expert_bias, int64_t n_group,
                                                              int64_t topk_group, int64_t top_k,
                                                              double routed_scaling_factor, bool renormalize,
                                                              const std::optional<at::Tensor>& expert_ids);

// Gradient of moe_route's weights w.r.t. router_logits: grad_weights [T, k] fp32 -> [T, E] fp32.
at::Tensor moe_route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& router_logits,
                                   const at::Tensor& expert_ids, double routed_scaling_factor, bool renormalize);

// Stable sort of token slots by expert, on the device: (tokens_per_expert [E] int32,
// offsets [E] int32 (cumulative ends, as torch._grouped_mm takes them), sorted_slot [S] int32 (slot at
// each sorted position), slot_pos [S] int32 (sorted position of each slot)). Ties keep slot order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cuda(const at::Tensor& expert_ids,
                                                                            int64_t num_experts);

// The same dispatch plus the touched experts: active [E + 1] int32 holds the experts with tokens in
// increasing order, then (at index E) their number.
struct Dispatch {
  at::Tensor counts, offsets, sorted_slot, slot_pos, active;
};
Dispatch dispatch_slots(const at::Tensor& expert_ids, int64_t num_experts);

// Routed SwiGLU experts, forward: (y [T, H], gate_up_out [S, 2I] (pre-activation, sorted order, kept
// for the backward), sorted_slot, slot_pos, offsets). bf16; deterministic; no host sync.
// atomic_combine: the grouped path's down GEMM adds its rows into an fp32 [T, H] buffer with atomics (opt-in).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_forward_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, bool atomic_combine);

// Backward of moe_experts_forward: (grad_x [T, H], grad_weights [T, k] fp32, grad_gate_up_proj [E, 2I, H],
// grad_down_proj [E, H, I]). Recomputes the gathered rows and the SwiGLU activation from gate_up_out.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& gate_up_out, const at::Tensor& sorted_slot,
    const at::Tensor& slot_pos, const at::Tensor& offsets);

}  // namespace ringkern
