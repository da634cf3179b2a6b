// Fused MTP input: out = cat[rms_norm(embeds), rms_norm(hidden)] @ eh_weight^T.
//
// The two norms write straight into the halves of one [N, 2H] GEMM operand (no separate normed copies and
// no concatenation), which one cuBLAS GEMM consumes and the backward keeps for grad_eh_weight. The
// backward runs two GEMMs (grad_normed = grad_out @ eh_weight, grad_eh_weight = grad_out^T @ normed) and
// the two norm backwards read their halves of grad_normed in place (row stride 2H).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/check.h"
#include "../norm/rms_norm.h"

namespace ringkern {
namespace {

void check_mtp_inputs(const at::Tensor& embeds, const at::Tensor& hidden, const at::Tensor& enorm_weight,
                      const at::Tensor& hnorm_weight, const at::Tensor& eh_weight) {
  check_cuda(embeds, "embeds");
  check_contiguous(embeds, "embeds");
  check_dtype(embeds, "embeds", {at::kFloat, at::kBFloat16, at::kHalf});
  RK_CHECK_ARG(embeds.dim() == 2, "embeds", "expected [N, H], got ", embeds.sizes());
  const int64_t H = embeds.size(1);
  struct Arg { const at::Tensor& t; const char* name; };
  for (const Arg& a : {Arg{hidden, "hidden"}, Arg{enorm_weight, "enorm_weight"}, Arg{hnorm_weight, "hnorm_weight"},
                       Arg{eh_weight, "eh_weight"}}) {
    check_same_device(a.t, embeds, a.name);
    check_contiguous(a.t, a.name);
  }
  RK_CHECK_ARG(hidden.sizes() == embeds.sizes() && hidden.scalar_type() == embeds.scalar_type(), "hidden",
               "expected shape ", embeds.sizes(), " and dtype ", embeds.scalar_type(), " (embeds'), got ",
               hidden.sizes(), " ", hidden.scalar_type());
  for (const Arg& a : {Arg{enorm_weight, "enorm_weight"}, Arg{hnorm_weight, "hnorm_weight"}}) {
    check_dtype(a.t, a.name, {at::kFloat, embeds.scalar_type()});
    RK_CHECK_ARG(a.t.dim() == 1 && a.t.size(0) == H, a.name, "expected shape [", H, "], got ", a.t.sizes());
  }
  RK_CHECK_ARG(eh_weight.dim() == 2 && eh_weight.size(0) == H && eh_weight.size(1) == 2 * H, "eh_weight",
               "expected shape [", H, ", ", 2 * H, "], got ", eh_weight.sizes());
  RK_CHECK_ARG(eh_weight.scalar_type() == embeds.scalar_type(), "eh_weight", "expected dtype ",
               embeds.scalar_type(), " (embeds'), got ", eh_weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> mtp_input_cuda(const at::Tensor& embeds, const at::Tensor& hidden,
                                                  const at::Tensor& enorm_weight, const at::Tensor& hnorm_weight,
                                                  const at::Tensor& eh_weight, double eps) {
  check_mtp_inputs(embeds, hidden, enorm_weight, hnorm_weight, eh_weight);
  const c10::cuda::CUDAGuard guard(embeds.device());
  const int64_t N = embeds.size(0), H = embeds.size(1);
  auto normed = at::empty({N, 2 * H}, embeds.options());
  auto e_half = normed.narrow(1, 0, H), h_half = normed.narrow(1, H, H);
  rms_norm_forward_out(embeds, enorm_weight, e_half, eps);
  rms_norm_forward_out(hidden, hnorm_weight, h_half, eps);
  return {at::mm(normed, eh_weight.t()), normed};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mtp_input_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& embeds, const at::Tensor& hidden, const at::Tensor& normed,
    const at::Tensor& enorm_weight, const at::Tensor& hnorm_weight, const at::Tensor& eh_weight, double eps) {
  check_mtp_inputs(embeds, hidden, enorm_weight, hnorm_weight, eh_weight);
  const int64_t N = embeds.size(0), H = embeds.size(1);
  for (const auto& [t, name, cols] : {std::tuple<const at::Tensor&, const char*, int64_t>{grad_out, "grad_out", H},
                                      {normed, "normed", 2 * H}}) {
    check_same_device(t, embeds, name);
    check_contiguous(t, name);
    RK_CHECK_ARG(t.dim() == 2 && t.size(0) == N && t.size(1) == cols && t.scalar_type() == embeds.scalar_type(),
                 name, "expected shape [", N, ", ", cols, "] and dtype ", embeds.scalar_type(), ", got ",
                 t.sizes(), " ", t.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(embeds.device());
  auto grad_normed = at::mm(grad_out, eh_weight);      // [N, 2H]
  auto grad_eh_weight = at::mm(grad_out.t(), normed);  // [H, 2H]
  auto [grad_embeds, grad_enorm] = rms_norm_backward_strided(grad_normed.narrow(1, 0, H), embeds, enorm_weight, eps);
  auto [grad_hidden, grad_hnorm] = rms_norm_backward_strided(grad_normed.narrow(1, H, H), hidden, hnorm_weight, eps);
  return {grad_embeds, grad_hidden, grad_enorm, grad_hnorm, grad_eh_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) {
  m.impl("mtp_input", &mtp_input_cuda);
  m.impl("mtp_input_backward", &mtp_input_backward_cuda);
}

}  // namespace ringkern
