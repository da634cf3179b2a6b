// Every ringkern op schema, declared once, and the Python module that reports the build.
// CUDA implementations register themselves next to their kernels (TORCH_LIBRARY_IMPL in the .cu files);
// the CPU implementations and fake (meta) kernels are registered in Python (ringkern/ops/_library.py), where
// the CPU kernels are the pure-PyTorch references; autograd kernels: csrc/autograd.cpp for the per-layer
// ops, Python for the loss ops.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(ringkern, m) {
  // RMSNorm over the last dim; fp32 math, output in x's dtype.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // Gradients of rms_norm: (grad_x, grad_weight).
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // Per-token log softmax(hidden @ weight^T / temperature)[targets] without [T, V] logits: (logp, entropy, lse),
  // fp32 [T] each (lse is saved for the backward).
  m.def("token_logprobs(Tensor hidden, Tensor weight, Tensor targets, float temperature) -> (Tensor, Tensor, Tensor)");
  // Gradients of grad_logp . logp + grad_entropy . entropy w.r.t. (hidden, weight); [0] where not asked for.
  m.def("token_logprobs_backward(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor targets, Tensor lse, Tensor entropy, float temperature, bool need_grad_hidden, "
        "bool need_grad_weight) -> (Tensor, Tensor)");
  // IcePop / TIS / plain clipped policy loss in one pass: (loss, metrics [8], grad_hidden, grad_weight), the
  // gradients those of the loss itself; with grad_weight_acc (fp32 [V, H]) grad_weight is added there instead.
  m.def("icepop_policy_loss(Tensor hidden, Tensor weight, Tensor targets, Tensor old_logprobs, "
        "Tensor rollout_logprobs, Tensor advantages, Tensor loss_mask, Tensor cu_seqlens, float alpha, float beta, "
        "float eps_low, float eps_high, float temperature, str correction, str aggregation, float tis_cap, "
        "bool need_grad_hidden, bool need_grad_weight, Tensor(a!)? grad_weight_acc) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Weighted cross-entropy (reduction "sum" or "mean") with its gradients, like icepop_policy_loss.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, "
        "Tensor? token_weights, str reduction, bool need_grad_hidden, bool need_grad_weight, "
        "Tensor(a!)? grad_weight_acc) -> (Tensor, Tensor, Tensor)");
  // Identity on a loss that routes the loss's precomputed gradients (scaled by the upstream gradient) to
  // hidden and weight in backward; weight_grad_in_buffer: weight's gradient already went into a caller's buffer.
  m.def("attach_grads(Tensor loss, Tensor hidden, Tensor weight, Tensor grad_hidden, Tensor grad_weight, "
        "bool weight_grad_in_buffer) -> Tensor");
  // MoE router: fused sigmoid, selection-only bias, group top-2 sum, keep topk_group groups, top-k, renormalize,
  // scale: (weights [T, k] fp32, expert_ids [T, k] int32, tokens_per_expert [E] int32); replay with expert_ids.
  m.def("moe_route(Tensor router_logits, Tensor expert_bias, int n_group, int topk_group, int top_k, "
        "float routed_scaling_factor, bool renormalize, Tensor? expert_ids) -> (Tensor, Tensor, Tensor)");
  // Gradient of moe_route's weights w.r.t. router_logits: [T, E] fp32.
  m.def("moe_route_backward(Tensor grad_weights, Tensor router_logits, Tensor expert_ids, "
        "float routed_scaling_factor, bool renormalize) -> Tensor");
  // Stable sort of token slots (t*k + j) by expert: (tokens_per_expert [E], offsets [E] (cumulative ends),
  // sorted_slot [T*k], slot_pos [T*k]), all int32.
  m.def("moe_dispatch(Tensor expert_ids, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  // Routed SwiGLU experts combined with the routing weights: (y [T, H], gate_up_out [T*k, 2I] (kept for the
  // backward), sorted_slot, slot_pos, offsets) with the dispatch of moe_dispatch. atomic_combine: opt in to
  // the combine fused into the down GEMM with fp32 atomics (CUDA grouped path; not bitwise reproducible).
  m.def("moe_experts_forward(Tensor x, Tensor weights, Tensor expert_ids, Tensor gate_up_proj, Tensor down_proj, "
        "bool atomic_combine=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Inference only (no autograd): moe_experts_forward's y plus the shared expert
  // down(silu(gate x) * up x), shared_gate, shared_up [Is, H], shared_down [H, Is]; -> [T, H].
  m.def("moe_block_inference(Tensor x, Tensor weights, Tensor expert_ids, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor shared_gate, Tensor shared_up, Tensor shared_down) -> Tensor");
  // Gradients of moe_experts_forward's y: (grad_x, grad_weights fp32, grad_gate_up_proj, grad_down_proj).
  m.def("moe_experts_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor gate_up_out, Tensor sorted_slot, Tensor slot_pos, Tensor offsets) -> (Tensor, Tensor, Tensor, Tensor)");
  // MTP input: cat[rms_norm(embeds), rms_norm(hidden)] @ eh_weight^T with embeds, hidden [N, H] and
  // eh_weight [H, 2H]: (out [N, H], normed [N, 2H], the GEMM operand kept for the backward).
  m.def("mtp_input(Tensor embeds, Tensor hidden, Tensor enorm_weight, Tensor hnorm_weight, Tensor eh_weight, "
        "float eps) -> (Tensor, Tensor)");
  // Gradients of mtp_input's out: (grad_embeds, grad_hidden, grad_enorm_weight, grad_hnorm_weight, grad_eh_weight).
  m.def("mtp_input_backward(Tensor grad_out, Tensor embeds, Tensor hidden, Tensor normed, Tensor enorm_weight, "
        "Tensor hnorm_weight, Tensor eh_weight, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Attention of decode queries q [B, Hq, T, D] (bf16) over cache rows k_cache, v_cache [R >= B, Hkv, S, D]:
  // query t of row b sees positions <= positions[b, t] ([B, T] int64); -> [B, Hq, T, D].
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions) -> Tensor");
  // The attention input of a cached step: the fused projection qkv [B, T, (n_heads + 2 n_kv) D] split into
  // heads, q and k RMS-normed (when the weights are given) and rotated by RoPE tables cos, sin [B, T, rot] fp32
  // (partial NeoX: the first rot channels): (q [B, n_heads, T, D], k, v [B, n_kv, T, D]); given the caches
  // [R >= B, n_kv, S, D] and positions [B, T] int64 in [0, S), k and v are also written at those positions
  // of cache rows 0..B-1. Inference only (no autograd).
  m.def("qkv_norm_rope(Tensor qkv, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, int n_heads, "
        "int n_kv, float eps, Tensor(a!)? k_cache, Tensor(b!)? v_cache, Tensor? positions) -> (Tensor, Tensor, Tensor)");
  // One token per row of logits [B, V] (bf16/fp32) and its fp32 log-prob: greedy at temperature 0, else the
  // Gumbel-max draw of ringkern.engine.gumbel_noise for (noise_keys, steps) [B] int64 -> (tokens int64, logprobs).
  m.def("sample_tokens(Tensor logits, Tensor noise_keys, Tensor steps, float temperature) -> (Tensor, Tensor)");
  // Router logits x [N, H] @ weight [E, H]^T in fp32 (fp32 accumulation; bf16 inputs read as they are).
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor");
}

#ifndef RINGKERN_CUDA_ARCHS
#define RINGKERN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringkern native ops (registered under torch.ops.ringkern)";
#ifdef RINGKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = RINGKERN_CUDA_ARCHS;
#ifdef RINGKERN_WITH_CUTLASS
  m.attr("with_cutlass") = true;
#else
  m.attr("with_cutlass") = false;
#endif
}
