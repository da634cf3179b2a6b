// The attention input of a cached (inference) step in one kernel: split the fused QKV projection into heads,
// RMS-normalize the query and key heads, apply partial NeoX RoPE to them, write q, k, v as [B, heads, T, D]
// and, given a KV cache, k and v at their positions of cache rows 0..B-1. In the decode step this replaces
// two norms, the ~18 elementwise kernels of the composed RoPE, the transposing copies and the two cache
// writes. Rounding follows the composition: the normed head is rounded to the input dtype before RoPE.
//
// One warp per (token, head); a head's row is staged in shared memory so each lane can read its RoPE
// partner (channel i pairs with i +- rot/2). Heads [0, Hq) are queries, [Hq, Hq + Hkv) keys, then values.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/check.h"
#include "../common/pdl.h"

namespace ringkern {
namespace {

constexpr int kWarps = 8;  // heads per block

template <typename T>
struct Args {
  const T* qkv;       // [N, (Hq + 2 Hkv) D]
  const T* q_weight;  // [D] or null (no norm)
  const T* k_weight;  // [D] or null
  const float* cos;   // [N, rot]
  const float* sin;
  T* q;  // [B, Hq, T, D]
  T* k;  // [B, Hkv, T, D]
  T* v;
  T* k_cache;  // [R, Hkv, S, D] or null
  T* v_cache;
  const int64_t* positions;  // [B, T]
  int64_t cache_len;         // S
  int tokens, hq, hkv, d, rot;
  float eps;
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) qkv_norm_rope_kernel(Args<T> a) {
  extern __shared__ float rows[];  // [kWarps][D]
  allow_next_grid();
  wait_for_previous_grid();  // a programmatic dependent launch: qkv comes from the previous kernel
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int heads = a.hq + 2 * a.hkv;
  const int head = blockIdx.y * kWarps + warp;
  if (head >= heads) return;  // whole warps only: no block-wide barrier below
  const int64_t n = blockIdx.x;  // token index b * T + t
  const int64_t b = n / a.tokens, t = n % a.tokens;
  const int D = a.d;
  const T* src = a.qkv + n * heads * D + int64_t{head} * D;
  float* row = rows + warp * D;

  const bool is_q = head < a.hq, is_k = !is_q && head < a.hq + a.hkv;
  const T* weight = is_q ? a.q_weight : is_k ? a.k_weight : nullptr;
  float ss = 0.f;
  for (int i = lane; i < D; i += 32) {
    const float x = static_cast<float>(src[i]);
    row[i] = x;
    ss += x * x;
  }
  if (weight != nullptr) {
    const float inv_rms = rsqrtf(warp_sum(ss) / D + a.eps);
    for (int i = lane; i < D; i += 32) {
      row[i] = static_cast<float>(static_cast<T>(row[i] * inv_rms * static_cast<float>(weight[i])));
    }
  }
  __syncwarp();

  const int rot = (is_q || is_k) ? a.rot : 0, half = rot / 2;
  const float* cos = a.cos + n * a.rot;
  const float* sin = a.sin + n * a.rot;
  const int h = is_q ? head : is_k ? head - a.hq : head - a.hq - a.hkv;
  const int64_t heads_here = is_q ? a.hq : a.hkv;
  T* out = (is_q ? a.q : is_k ? a.k : a.v) + ((b * heads_here + h) * a.tokens + t) * D;
  T* cache = is_q ? nullptr : is_k ? a.k_cache : a.v_cache;
  if (cache != nullptr) {
    const int64_t position = a.positions[n];
    CUDA_KERNEL_ASSERT(position >= 0 && position < a.cache_len);
    cache += ((b * a.hkv + h) * a.cache_len + position) * D;
  }
  for (int i = lane; i < D; i += 32) {
    float y = row[i];
    if (i < rot) y = y * cos[i] + (i < half ? -row[i + half] : row[i - half]) * sin[i];
    const T value = static_cast<T>(y);
    out[i] = value;
    if (cache != nullptr) cache[i] = value;
  }
}

void check_cache(const at::Tensor& cache, const at::Tensor& qkv, const char* name, int64_t B, int64_t hkv,
                 int64_t D) {
  check_same_device(cache, qkv, name);
  RK_CHECK_ARG(cache.scalar_type() == qkv.scalar_type(), name, "expected dtype ", qkv.scalar_type(), ", got ",
               cache.scalar_type());
  RK_CHECK_ARG(cache.dim() == 4 && cache.size(0) >= B && cache.size(1) == hkv && cache.size(3) == D, name,
               "expected [R >= ", B, ", ", hkv, ", S, ", D, "], got ", cache.sizes());
  RK_CHECK_ARG(cache.stride(3) == 1 && cache.stride(2) == D && cache.stride(1) == cache.size(2) * D &&
                   cache.stride(0) == hkv * cache.size(2) * D,
               name, "expected a contiguous cache tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_norm_rope_cuda(
    const at::Tensor& qkv, const std::optional<at::Tensor>& q_weight, const std::optional<at::Tensor>& k_weight,
    const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, int64_t n_kv, double eps,
    const std::optional<at::Tensor>& k_cache, const std::optional<at::Tensor>& v_cache,
    const std::optional<at::Tensor>& positions) {
  check_cuda(qkv, "qkv");
  check_dtype(qkv, "qkv", {at::kBFloat16, at::kHalf, at::kFloat});
  RK_CHECK_ARG(n_heads > 0 && n_kv > 0, "n_kv", "expected positive head counts, got ", n_heads, " and ", n_kv);
  RK_CHECK_ARG(qkv.dim() == 3 && qkv.is_contiguous() && qkv.size(2) % (n_heads + 2 * n_kv) == 0, "qkv",
               "expected a contiguous [B, T, (n_heads + 2 n_kv) D] tensor, got ", qkv.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(2) / (n_heads + 2 * n_kv);
  RK_CHECK_ARG(q_weight.has_value() == k_weight.has_value(), "k_weight", "give both norm weights or neither");
  for (auto [w, name] : {std::pair{&q_weight, "q_weight"}, std::pair{&k_weight, "k_weight"}}) {
    if (!w->has_value()) continue;
    check_same_device(**w, qkv, name);
    RK_CHECK_ARG((*w)->dim() == 1 && (*w)->size(0) == D && (*w)->scalar_type() == qkv.scalar_type() &&
                     (*w)->is_contiguous(),
                 name, "expected a contiguous [", D, "] tensor of dtype ", qkv.scalar_type());
  }
  for (auto [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_same_device(*t, qkv, name);
    check_dtype(*t, name, {at::kFloat});
    RK_CHECK_ARG(t->dim() == 3 && t->size(0) == B && t->size(1) == T && t->size(2) <= D && t->size(2) % 2 == 0 &&
                     t->is_contiguous(),
                 name, "expected a contiguous [", B, ", ", T, ", rot] tensor with an even rot <= ", D, ", got ",
                 t->sizes());
  }
  RK_CHECK_ARG(sin.sizes() == cos.sizes(), "sin", "expected the shape of cos, ", cos.sizes(), ", got ", sin.sizes());
  RK_CHECK_ARG(k_cache.has_value() == v_cache.has_value() && k_cache.has_value() == positions.has_value(),
               "positions", "give k_cache, v_cache and positions together or none of them");
  if (k_cache.has_value()) {
    check_cache(*k_cache, qkv, "k_cache", B, n_kv, D);
    check_cache(*v_cache, qkv, "v_cache", B, n_kv, D);
    RK_CHECK_ARG(k_cache->sizes() == v_cache->sizes(), "v_cache", "expected the shape of k_cache");
    check_same_device(*positions, qkv, "positions");
    check_dtype(*positions, "positions", {at::kLong});
    RK_CHECK_ARG(positions->dim() == 2 && positions->size(0) == B && positions->size(1) == T &&
                     positions->is_contiguous(),
                 "positions", "expected a contiguous [", B, ", ", T, "] tensor, got ", positions->sizes());
  }
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto q = at::empty({B, n_heads, T, D}, qkv.options());
  auto k = at::empty({B, n_kv, T, D}, qkv.options());
  auto v = at::empty({B, n_kv, T, D}, qkv.options());
  if (qkv.numel() == 0) return {q, k, v};
  const dim3 grid(static_cast<unsigned>(B * T), static_cast<unsigned>((n_heads + 2 * n_kv + kWarps - 1) / kWarps));
  const size_t smem = kWarps * D * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "qkv_norm_rope", [&] {
    Args<scalar_t> a{qkv.data_ptr<scalar_t>(),
                     q_weight ? q_weight->data_ptr<scalar_t>() : nullptr,
                     k_weight ? k_weight->data_ptr<scalar_t>() : nullptr,
                     cos.data_ptr<float>(),
                     sin.data_ptr<float>(),
                     q.data_ptr<scalar_t>(),
                     k.data_ptr<scalar_t>(),
                     v.data_ptr<scalar_t>(),
                     k_cache ? k_cache->data_ptr<scalar_t>() : nullptr,
                     v_cache ? v_cache->data_ptr<scalar_t>() : nullptr,
                     positions ? positions->data_ptr<int64_t>() : nullptr,
                     k_cache ? k_cache->size(2) : 0,
                     static_cast<int>(T),
                     static_cast<int>(n_heads),
                     static_cast<int>(n_kv),
                     static_cast<int>(D),
                     static_cast<int>(cos.size(2)),
                     static_cast<float>(eps)};
    auto kernel = qkv_norm_rope_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    launch_dependent(kernel, grid, dim3(kWarps * 32), smem, stream, a);
  });
  return {q, k, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) { m.impl("qkv_norm_rope", &qkv_norm_rope_cuda); }

}  // namespace ringkern
