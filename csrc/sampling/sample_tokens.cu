// The decode step's token draw, fused: one token per row of logits [B, V] and its fp32 log-probability, in two
// launches instead of the ~15 small PyTorch kernels of ringkern.engine.sample (about 60 us at batch 1 on an H200,
// V = 157K). All math in fp32 (bf16 logits are widened on load). For row b with logits z:
//   temperature 0 (greedy): token = argmax_v z_v, logprob = z_token - lse(z);
//   temperature T > 0: s = z * (1 / T), token = argmax_v (s_v + g_v), logprob = s_token - lse(s), with g the
//     Gumbel noise of ringkern.engine.gumbel_noise for (noise_keys[b], steps[b]) bit for bit: on the low 32 bits
//     of key and step, row = hash32(key ^ hash32(step)), bits = hash32(row ^ hash32(v)) >> 9,
//     u = (bits + 0.5f) / 2^23 in fp32 (in (0, 1): 23 bits keep bits + 0.5 exact), g = -logf(-logf(u)) (logf as
//     ATen's CUDA log: no fast math).
// lse(x) = m + log(sum_v exp(x_v - m)), m = max x. The argmax is torch.argmax's: the lowest index among equal
// maxima, and a NaN beats every number.
//
// How close to the PyTorch path (ringkern.ops.inference.sample_tokens_reference, the op's CPU kernel):
// - s: ATen's CUDA division by a Python scalar multiplies by the scalar's fp32 reciprocal, so s = z * (1 / T)
//   here is bitwise the engine's `logits / temperature` on CUDA (the reference on the CPU divides: an ulp apart).
// - The engine adds the noise to logp = s - lse(s), not to s. With lse one constant per row the argmax is
//   mathematically the same, but fp32 rounding of logp + g and s + g can order two keys within a few ulp of
//   each other differently, so a draw may differ from the PyTorch path on such fp32 near-ties only.
// - lse sums in another order than torch's logsumexp: log-probs agree to ~1e-6 relative.
// - A row holding a NaN or +inf logit has a NaN lse, so the engine's noisy keys are all NaN and it draws token 0,
//   where here the NaN's or +inf's index wins; greedy draws agree (torch.argmax); the log-prob is NaN either way.
//
// Two launches, no host sync and no atomics, so a CUDA graph can capture them and every run is bitwise the same:
//   partial: grid (splits, B), 256 threads; block (j, b) reduces chunk j of row b to (max s, sum exp(s - max),
//     best key, its index) in the workspace [B, splits]. Each thread keeps an online log-sum-exp and argmax over
//     its elements (16-byte loads, four in flight, a scalar head and tail where the chunk's start is not
//     16-byte aligned); the block then reduces its threads in a fixed shuffle tree and its warps in warp order.
//   merge: a warp per row combines the row's partials in a fixed order (M = max m_j, S = sum S_j exp(m_j - M)),
//     reads z_token again and writes the token and logprob.
// The splits depend on B, V and the SM count only: chunks of >= 1024 elements, at most 128 splits, about two
// blocks per SM in all (B = 1, V = 157184: 128 blocks of 1232 elements; B = 256: 2 splits per row).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <tuple>

#include "../common/check.h"

namespace ringkern {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kThreads = 256;            // partial kernel
constexpr int kWarps = kThreads / 32;
constexpr int kLoads = 4;                // 16-byte loads in flight per thread
constexpr int kMinChunk = 1024;          // elements of a block at least
constexpr int kMaxSplits = 128;          // blocks of a row at most
constexpr int kMergeWarps = 4;           // rows of a merge block
constexpr unsigned kFull = 0xffffffffu;
constexpr uint32_t kMixA = 0x2C1B3C6Du;  // ringkern.engine._MIX_A, _MIX_B
constexpr uint32_t kMixB = 0x297A2D39u;

// ringkern.engine.hash32 (there on int64 holding 32-bit values, masked after each product).
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixA;
  x ^= x >> 15;
  x *= kMixB;
  return x ^ (x >> 16);
}

// engine.gumbel_noise of vocabulary index v in the row hashed to `row`. Rounded steps as in ATen's kernels:
// bits + 0.5 in fp32, times 2^-23 (exact, as ATen's division by a scalar power of two), then two logf.
__device__ __forceinline__ float gumbel(uint32_t row, uint32_t v) {
  const uint32_t bits = hash32(row ^ hash32(v)) >> 9;
  const float u = __fmul_rn(__fadd_rn(static_cast<float>(bits), 0.5f), 0x1p-23f);
  return -logf(-logf(u));
}

// "a beats b" in torch.argmax's order: NaN first (the lower index among NaNs), then the larger value, then the
// lower index.
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
  if (isnan(va)) return !isnan(vb) || ia < ib;
  return va > vb || (va == vb && ia < ib);
}

// The reduction of some elements of a row: log-sum-exp state of s and the argmax of the keys (s, or s + g).
struct Partial {
  float m;    // max s; -FLT_MAX while every s is -inf, so exp(s - m) never computes -inf - -inf
  float sum;  // sum exp(s - m)
  float best;
  int index;  // INT_MAX while empty: any element beats it
};

__device__ __forceinline__ Partial empty_partial() { return {-FLT_MAX, 0.f, -INFINITY, INT_MAX}; }

__device__ __forceinline__ Partial combine(const Partial& a, const Partial& b) {
  const float m = fmaxf(a.m, b.m);
  const float sum = a.sum * expf(a.m - m) + b.sum * expf(b.m - m);
  return beats(b.best, b.index, a.best, a.index) ? Partial{m, sum, b.best, b.index} : Partial{m, sum, a.best, a.index};
}

__device__ __forceinline__ Partial warp_combine(Partial p) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const Partial q{__shfl_xor_sync(kFull, p.m, o), __shfl_xor_sync(kFull, p.sum, o),
                    __shfl_xor_sync(kFull, p.best, o), __shfl_xor_sync(kFull, p.index, o)};
    p = combine(p, q);
  }
  return p;
}

// The tempered logit (noise draws) or the logit (greedy). __fmul_rn: never contracted into an fma with the
// noise, so s + g adds the rounded s, as the engine's separate kernels do.
template <bool kNoise>
__device__ __forceinline__ float scaled(float z, float inv_t) {
  if constexpr (kNoise) {
    return __fmul_rn(z, inv_t);
  } else {
    return z;
  }
}

// Adds the N consecutive elements z (vocabulary indices v0, v0 + 1, ...) to the thread's partial; one rescale of
// the sum per call at most.
template <bool kNoise, int N>
__device__ __forceinline__ void add_elements(Partial& p, float (&z)[N], int v0, float inv_t, uint32_t row) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    z[i] = scaled<kNoise>(z[i], inv_t);
    mx = fmaxf(mx, z[i]);
  }
  if (mx > p.m) {
    p.sum *= expf(p.m - mx);
    p.m = mx;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    p.sum += expf(z[i] - p.m);
    float key = z[i];
    if constexpr (kNoise) key = __fadd_rn(key, gumbel(row, static_cast<uint32_t>(v0 + i)));
    if (beats(key, v0 + i, p.best, p.index)) {
      p.best = key;
      p.index = v0 + i;
    }
  }
}

template <typename T>
__device__ __forceinline__ float load_scalar(const T* p);
template <>
__device__ __forceinline__ float load_scalar<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_scalar<bf16>(const bf16* p) { return __bfloat162float(__ldg(p)); }

// The 16 bytes r as fp32 elements (bf16: the bits shifted into a float's high half, exact).
__device__ __forceinline__ void unpack(const uint4& r, float (&z)[4]) {
  z[0] = __uint_as_float(r.x);
  z[1] = __uint_as_float(r.y);
  z[2] = __uint_as_float(r.z);
  z[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ void unpack(const uint4& r, float (&z)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    z[2 * i] = __uint_as_float(w[i] << 16);
    z[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Block (j, b) reduces elements [j chunk, min(V, (j + 1) chunk)) of row b into partials[b * splits + j] as
// float4 (m, sum, best, index bits). A thread's elements come in increasing index order: one of the unaligned
// head, its 16-byte vectors tid, tid + 256, ..., one of the tail.
template <typename T, bool kNoise>
__global__ void __launch_bounds__(kThreads)
    sample_partial_kernel(const T* __restrict__ logits, const int64_t* __restrict__ noise_keys,
                          const int64_t* __restrict__ steps, int V, int chunk, float inv_t,
                          float4* __restrict__ partials) {
  constexpr int kVec = 16 / sizeof(T);
  const int j = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const T* row_ptr = logits + static_cast<int64_t>(b) * V;
  const int lo = j * chunk, n = min(chunk, V - lo);
  uint32_t row = 0;
  if constexpr (kNoise) {
    row = hash32(static_cast<uint32_t>(noise_keys[b]) ^ hash32(static_cast<uint32_t>(steps[b])));
  }

  const int head =
      min(n, static_cast<int>((0 - reinterpret_cast<uintptr_t>(row_ptr + lo) / sizeof(T)) & (kVec - 1)));
  const int body = lo + head, vecs = (n - head) / kVec, tail = body + vecs * kVec;
  Partial p = empty_partial();
  if (tid < head) {
    float z[1] = {load_scalar(row_ptr + lo + tid)};
    add_elements<kNoise>(p, z, lo + tid, inv_t, row);
  }
  const uint4* vp = reinterpret_cast<const uint4*>(row_ptr + body);
  for (int i = tid; i < vecs; i += kThreads * kLoads) {
    uint4 r[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (i + u * kThreads < vecs) r[u] = __ldg(vp + i + u * kThreads);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (i + u * kThreads < vecs) {
        float z[kVec];
        unpack(r[u], z);
        add_elements<kNoise>(p, z, body + (i + u * kThreads) * kVec, inv_t, row);
      }
    }
  }
  if (tail + tid < lo + n) {
    float z[1] = {load_scalar(row_ptr + tail + tid)};
    add_elements<kNoise>(p, z, tail + tid, inv_t, row);
  }

  __shared__ Partial warps[kWarps];
  p = warp_combine(p);
  if (tid % 32 == 0) warps[tid / 32] = p;
  __syncthreads();
  if (tid < 32) {
    p = tid < kWarps ? warps[tid] : empty_partial();
    p = warp_combine(p);
    if (tid == 0) {
      partials[static_cast<int64_t>(b) * gridDim.x + j] = make_float4(p.m, p.sum, p.best, __int_as_float(p.index));
    }
  }
}

// Warp w of block k finishes row b = k * kMergeWarps + w: its partials (lane l takes splits l, l + 32, ... in
// order, then the fixed shuffle tree), lse = M + log S, and the token's logprob from its logit read again.
template <typename T, bool kNoise>
__global__ void __launch_bounds__(32 * kMergeWarps)
    sample_merge_kernel(const float4* __restrict__ partials, const T* __restrict__ logits, int B, int V, int splits,
                        float inv_t, int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  const int b = blockIdx.x * kMergeWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (b >= B) return;
  Partial p = empty_partial();
  for (int s = lane; s < splits; s += 32) {
    const float4 q = __ldg(partials + static_cast<int64_t>(b) * splits + s);
    p = combine(p, Partial{q.x, q.y, q.z, __float_as_int(q.w)});
  }
  p = warp_combine(p);
  if (lane == 0) {
    const float s_token = scaled<kNoise>(load_scalar(logits + static_cast<int64_t>(b) * V + p.index), inv_t);
    tokens[b] = p.index;
    logprobs[b] = s_token - (p.m + logf(p.sum));
  }
}

template <typename T, bool kNoise>
void launch(const at::Tensor& logits, const at::Tensor& noise_keys, const at::Tensor& steps, float inv_t,
            at::Tensor& tokens, at::Tensor& logprobs) {
  const int B = static_cast<int>(logits.size(0)), V = static_cast<int>(logits.size(1));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int by_size = (V + kMinChunk - 1) / kMinChunk, by_grid = (2 * sms + B - 1) / B;
  const int want = std::clamp(std::min(by_size, by_grid), 1, kMaxSplits);
  const int chunk = ((V + want - 1) / want + 7) / 8 * 8;  // whole 16-byte vectors of either dtype
  const int splits = (V + chunk - 1) / chunk;             // every split non-empty
  auto workspace = at::empty({int64_t{B} * splits * 4}, logits.options().dtype(at::kFloat));
  float4* partials = reinterpret_cast<float4*>(workspace.data_ptr<float>());
  const T* z = reinterpret_cast<const T*>(logits.data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  sample_partial_kernel<T, kNoise><<<dim3(splits, B), kThreads, 0, stream>>>(
      z, noise_keys.data_ptr<int64_t>(), steps.data_ptr<int64_t>(), V, chunk, inv_t, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sample_merge_kernel<T, kNoise><<<(B + kMergeWarps - 1) / kMergeWarps, 32 * kMergeWarps, 0, stream>>>(
      partials, z, B, V, splits, inv_t, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_temperature(const at::Tensor& logits, const at::Tensor& noise_keys, const at::Tensor& steps,
                            double temperature, at::Tensor& tokens, at::Tensor& logprobs) {
  if (temperature == 0) {
    launch<T, false>(logits, noise_keys, steps, 1.f, tokens, logprobs);
  } else {  // ATen's fp32 reciprocal of the scalar (see the top of the file)
    launch<T, true>(logits, noise_keys, steps, 1.f / static_cast<float>(temperature), tokens, logprobs);
  }
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& noise_keys,
                                                      const at::Tensor& steps, double temperature) {
  check_cuda(logits, "logits");
  RK_CHECK_ARG(logits.dim() == 2, "logits", "expected a 2-D tensor [B, V], got shape ", logits.sizes());
  check_dtype(logits, "logits", {at::kBFloat16, at::kFloat});
  check_contiguous(logits, "logits");
  const int64_t B = logits.size(0), V = logits.size(1);
  RK_CHECK_ARG(V >= 1 && V <= INT_MAX, "logits", "expected a vocabulary size in [1, 2^31), got shape ",
               logits.sizes());
  RK_CHECK_ARG(B <= 65535, "logits", "expected at most 65535 rows, got shape ", logits.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{noise_keys, "noise_keys"}, {steps, "steps"}}) {
    check_same_device(t, logits, name);
    check_dtype(t, name, {at::kLong});
    RK_CHECK_ARG(t.dim() == 1 && t.size(0) == B, name, "expected shape [", B, "], got ", t.sizes());
    check_contiguous(t, name);
  }
  RK_CHECK_ARG(std::isfinite(temperature) && temperature >= 0, "temperature",
               "expected a finite value >= 0 (0 = greedy), got ", temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  if (logits.scalar_type() == at::kBFloat16) {
    launch_for_temperature<bf16>(logits, noise_keys, steps, temperature, tokens, logprobs);
  } else {
    launch_for_temperature<float>(logits, noise_keys, steps, temperature, tokens, logprobs);
  }
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) { m.impl("sample_tokens", &sample_tokens_cuda); }

}  // namespace ringkern
