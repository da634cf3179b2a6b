// Input validation for host entry points: every failure names the argument and what was expected.
#pragma once
#include <torch/types.h>

#define RK_CHECK_ARG(cond, arg, ...) TORCH_CHECK(cond, "ringkern: argument '", arg, "': ", __VA_ARGS__)

namespace ringkern {

inline void check_cuda(const at::Tensor& t, const char* name) {
  RK_CHECK_ARG(t.is_cuda(), name, "expected a CUDA tensor, got device ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  RK_CHECK_ARG(t.is_contiguous(), name, "expected a contiguous tensor (call .contiguous())");
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  std::string names;
  for (auto d : allowed) names += std::string(names.empty() ? "" : " or ") + c10::toString(d);
  RK_CHECK_ARG(false, name, "expected dtype ", names, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  RK_CHECK_ARG(t.device() == ref.device(), name, "expected device ", ref.device(), ", got ", t.device());
}

}  // namespace ringkern
