// Input validation for host entry points: every failure names the argument and what was expected.
#pragma once
#include <torch/types.h>

// The message is built here, numbers with std::to_string, and handed to TORCH_CHECK as one string: on the
// GPU machine (torch 2.11) streaming integers into c10::Error's ostringstream from our translation units
// ended the process with SIGSEGV (benchmarks/RESULTS.md), while streaming strings raised normally.
#define RK_CHECK_ARG(cond, arg, ...) \
  TORCH_CHECK(cond, ::ringkern::detail::message("ringkern: argument '", arg, "': ", __VA_ARGS__))
#define RK_CHECK(cond, ...) TORCH_CHECK(cond, ::ringkern::detail::message(__VA_ARGS__))

namespace ringkern {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ']';
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace detail

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
