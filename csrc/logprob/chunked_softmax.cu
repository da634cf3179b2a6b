// Chunked linear + softmax over the vocabulary: the fused row kernel and the chunk loop that drives it
// between the GEMMs (see chunked_softmax.h for the data flow).
#include "chunked_softmax.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "../common/blas.h"
#include "sm90_gemm.h"
#include "sm90_logits_stats.h"

namespace ringkern::logprob {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;
// Bytes of one chunk's logits buffer: the only [rows, V] allocation of a pass.
constexpr int64_t kLogitsBudgetBytes = int64_t{5} << 28;  // 1.25 GiB
constexpr int64_t kChunkRowAlign = 128;                   // GEMM-friendly chunk heights
constexpr int64_t kLdAlign = 8;                           // logits row stride: 32-byte aligned fp32 rows
constexpr int kUnit = 8;                                  // logits per thread per round of write_row_grad

// 16-byte packs of T read and written by the row kernel.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T>
__device__ __forceinline__ void load_scaled(const T* p, float inv_temp, float (&z)[Pack<T>::kN]) {
  Pack<T> pack;
  *reinterpret_cast<uint4*>(&pack) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int k = 0; k < Pack<T>::kN; ++k) z[k] = static_cast<float>(pack.v[k]) * inv_temp;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&d)[Pack<T>::kN]) {
  Pack<T> pack;
#pragma unroll
  for (int k = 0; k < Pack<T>::kN; ++k) pack.v[k] = static_cast<T>(d[k]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&pack);
}

// Online softmax statistics of a set of scaled logits z: m = max (or a -1e30 sentinel when empty),
// s = sum exp(z - m), t = sum exp(z - m) * (z - m). Then lse = m + log s and entropy = log s - t / s.
struct SoftmaxStats {
  float m = -1e30f;
  float s = 0.f;
  float t = 0.f;
};

// Rescaling with the sentinel is safe: exp(-1e30 - x) = 0 and the (m - M) * s term is 0 * finite.
__device__ __forceinline__ SoftmaxStats merge(const SoftmaxStats& a, const SoftmaxStats& b) {
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m, db = b.m - m;
  const float ea = __expf(da), eb = __expf(db);
  return {m, a.s * ea + b.s * eb, ea * fmaf(da, a.s, a.t) + eb * fmaf(db, b.s, b.t)};
}

template <int N>
__device__ __forceinline__ void accumulate(SoftmaxStats& st, const float (&z)[N]) {
  float vmax = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vmax = fmaxf(vmax, z[k]);
  if (vmax > st.m) {
    const float d = st.m - vmax, scale = __expf(d);
    st.t = scale * fmaf(d, st.s, st.t);
    st.s *= scale;
    st.m = vmax;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = z[k] - st.m, e = __expf(d);
    st.s += e;
    st.t = fmaf(e, d, st.t);
  }
}

// Merges the statistics of the whole block; every thread gets the same result (fixed merge order).
__device__ SoftmaxStats block_merge(SoftmaxStats st, SoftmaxStats* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const SoftmaxStats other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                             __shfl_xor_sync(0xffffffffu, st.t, offset)};
    st = merge(st, other);
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = st;
  __syncthreads();
  SoftmaxStats total = scratch[0];
  for (int w = 1; w < kRowWarps; ++w) total = merge(total, scratch[w]);
  return total;
}

// Statistics of one row of V logits (row start 16-byte aligned), scaled by inv_temp.
template <typename T>
__device__ SoftmaxStats row_stats(const T* x, int64_t vocab, float inv_temp) {
  constexpr int N = Pack<T>::kN;
  SoftmaxStats st;
  const int64_t n_packs = vocab / N;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n_packs; i += kRowThreads) {
    float z[N];
    load_scaled(x + i * N, inv_temp, z);
    accumulate(st, z);
  }
  const int64_t tail = n_packs * N + threadIdx.x;
  if (tail < vocab) {
    const float z[1] = {static_cast<float>(x[tail]) * inv_temp};
    accumulate(st, z);
  }
  return st;
}

// d/d(z_i) of a * logp + b * entropy times inv_temp (ca = a * inv_temp, cb = b * inv_temp) at the scaled logit
// z_i: inv_temp * (a * (onehot_i - p_i) - b * p_i * (z_i - mean_z)), p_i = exp(z_i - lse).
struct LogitGrad {
  int64_t target;
  float lse, mean_z, ca, cb;

  __device__ __forceinline__ float operator()(float z, int64_t i) const {
    const float d = ca == 0.f && cb == 0.f ? 0.f : -__expf(z - lse) * fmaf(cb, z - mean_z, ca);
    return i == target ? d + ca : d;
  }
};

// Writes d/d(logits) of a*logp + b*entropy (each times inv_temp) over a row of fp32 logits, in place and
// narrowed to T: d_i = inv_temp * (a * (onehot_i - p_i) - b * p_i * (z_i - mean_z)), p_i = exp(z_i - lse).
// Element i of the T row starts at byte i * sizeof(T) of the fp32 row, i.e. inside fp32 element <= i, so
// each round reads its units into registers and synchronizes before any of them is overwritten.
template <typename T>
__device__ void write_row_grad(float* x, int64_t vocab, int64_t target, float inv_temp, float lse, float mean_z,
                               float a, float b) {
  constexpr int N = Pack<T>::kN;
  static_assert(kUnit % N == 0 && kUnit % Pack<float>::kN == 0);
  T* out = reinterpret_cast<T*>(x);
  const LogitGrad grad{target, lse, mean_z, a * inv_temp, b * inv_temp};
  const int64_t n_units = vocab / kUnit;
  const int64_t tail = n_units * kUnit + threadIdx.x;
  const bool has_tail = threadIdx.x < kUnit && tail < vocab;
  const float tail_z = has_tail ? x[tail] * inv_temp : 0.f;
  for (int64_t base = 0; base < n_units; base += kRowThreads) {
    const int64_t u = base + threadIdx.x;
    float d[kUnit];
    if (u < n_units) {
#pragma unroll
      for (int p = 0; p < kUnit / Pack<float>::kN; ++p) {
        float z[Pack<float>::kN];
        load_scaled(x + u * kUnit + p * Pack<float>::kN, inv_temp, z);
#pragma unroll
        for (int k = 0; k < Pack<float>::kN; ++k) d[p * Pack<float>::kN + k] = z[k];
      }
#pragma unroll
      for (int k = 0; k < kUnit; ++k) d[k] = grad(d[k], u * kUnit + k);
    }
    __syncthreads();  // this round's units are read before any of them is overwritten
    if (u < n_units) {
#pragma unroll
      for (int p = 0; p < kUnit / N; ++p) {
        float part[N];
#pragma unroll
        for (int k = 0; k < N; ++k) part[k] = d[p * N + k];
        store_pack(out + u * kUnit + p * N, part);
      }
    }
  }
  __syncthreads();  // the tail's T slot lies inside fp32 elements read in the last round
  if (has_tail) out[tail] = static_cast<T>(grad(tail_z, tail));
}

__device__ __forceinline__ float token_coef(const TokenCoef& c, int64_t t, float logp) {
  const float scale = c.scale[t];
  if (scale == 0.f) return 0.f;
  if (c.kind == CoefKind::kLinear) return -scale;
  const float adv = c.advantage[t];
  const float ratio = expf(logp - c.old_logp[t]);
  const bool clipped = (adv > 0.f && ratio > c.ratio_high) || (adv < 0.f && ratio < c.ratio_low);
  return clipped ? 0.f : -scale * adv * ratio;
}

struct RowArgs {
  int64_t vocab, ld, row0;  // row0: token index of the chunk's first row
  float inv_temp;
  RowMode mode;
  const int64_t* targets;
  float *logp, *entropy, *lse;
  TokenCoef coef;
  const float *grad_logp, *grad_entropy;
};

// One block per row of the chunk: fp32 logits in, d/d(logits) in T out (same storage, see write_row_grad).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) softmax_rows_kernel(float* logits, RowArgs args) {
  __shared__ SoftmaxStats scratch[kRowWarps];
  const int64_t row = blockIdx.x, t = args.row0 + row;
  float* x = logits + row * args.ld;
  const int64_t target = args.targets[t];
  float lse, mean_z, a, b = 0.f;
  if (args.mode == RowMode::kGrad) {
    lse = args.lse[t];
    mean_z = lse - args.entropy[t];
    a = args.grad_logp[t];
    b = args.grad_entropy[t];
  } else {
    const SoftmaxStats st = block_merge(row_stats(x, args.vocab, args.inv_temp), scratch);
    const float log_s = logf(st.s), entropy = log_s - st.t / st.s;
    lse = st.m + log_s;
    mean_z = lse - entropy;
    const float logp = x[target] * args.inv_temp - lse;  // read before write_row_grad's first barrier
    if (threadIdx.x == 0) {
      args.logp[t] = logp;
      args.entropy[t] = entropy;
      args.lse[t] = lse;
    }
    if (args.mode == RowMode::kStats) return;
    a = token_coef(args.coef, t, logp);
  }
  write_row_grad<T>(x, args.vocab, target, args.inv_temp, lse, mean_z, a, b);
}

// One block per row of a chunk of bf16 logits (unscaled, as the GEMM wrote them): d/d(logits) in place, from
// the row's statistics (kGrad: saved by the forward; kStatsAndGrad: just written by the statistics GEMM, with
// the token coefficient of its log-prob). Each thread rewrites only the elements it read.
__global__ void __launch_bounds__(kRowThreads) grad_rows_bf16_kernel(c10::BFloat16* logits, RowArgs args) {
  using T = c10::BFloat16;
  constexpr int N = Pack<T>::kN;
  const int64_t row = blockIdx.x, t = args.row0 + row;
  T* x = logits + row * args.ld;
  const float lse = args.lse[t];
  float a, b = 0.f;
  if (args.mode == RowMode::kGrad) {
    a = args.grad_logp[t];
    b = args.grad_entropy[t];
  } else {
    a = token_coef(args.coef, t, args.logp[t]);
  }
  const LogitGrad grad{args.targets[t], lse, lse - args.entropy[t], a * args.inv_temp, b * args.inv_temp};
  const int64_t n_packs = args.vocab / N;
  for (int64_t i = threadIdx.x; i < n_packs; i += kRowThreads) {
    float z[N];
    load_scaled(x + i * N, args.inv_temp, z);
#pragma unroll
    for (int k = 0; k < N; ++k) z[k] = grad(z[k], i * N + k);
    store_pack(x + i * N, z);
  }
  const int64_t tail = n_packs * N + threadIdx.x;
  if (tail < args.vocab) x[tail] = static_cast<T>(grad(static_cast<float>(x[tail]) * args.inv_temp, tail));
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Rows per chunk: as many as the logits budget allows (or RINGKERN_LOGPROB_MAX_CHUNK_ROWS, which tests use
// to force many chunks on small inputs), balanced over the chunks, GEMM-aligned.
int64_t chunk_rows(int64_t tokens, int64_t ld, int64_t elem_size) {
  int64_t max_rows = std::max<int64_t>(1, kLogitsBudgetBytes / (ld * elem_size));
  if (const char* cap = std::getenv("RINGKERN_LOGPROB_MAX_CHUNK_ROWS")) {
    max_rows = std::clamp<int64_t>(std::atoll(cap), 1, max_rows);
  }
  const int64_t align = max_rows >= kChunkRowAlign ? kChunkRowAlign : 1;
  max_rows = max_rows / align * align;
  const int64_t n_chunks = ceil_div(tokens, max_rows);
  return std::min(tokens, round_up(ceil_div(tokens, n_chunks), align));
}

// Whether bf16 -> fp32 weight gradients take the CUTLASS kernel (sm90_gemm.cu); RINGKERN_LOGPROB_CUTLASS=0
// keeps them on cuBLAS (for comparison).
bool use_cutlass_grad_weight() {
  const char* env = std::getenv("RINGKERN_LOGPROB_CUTLASS");
  return !(env && std::string(env) == "0");
}

// grad_weight [V, H] (+)= D^T [V, rows] @ hidden [rows, H], in fp32 or in the inputs' dtype.
template <typename T>
void grad_weight_gemm(const PassArgs& p, const T* h, const T* d, int64_t rows, int64_t ld, float beta) {
  const int64_t H = p.hidden.size(1), V = p.weight.size(0);
  if (p.grad_weight.scalar_type() == at::kFloat && !std::is_same_v<T, float>) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (use_cutlass_grad_weight() &&
          grad_weight_gemm_sm90(h, d, rows, ld, H, V, beta, p.grad_weight.data_ptr<float>(),
                                at::cuda::getCurrentCUDAStream())) {
        return;
      }
    }
    gemm<T, float>('n', 't', H, V, rows, h, H, d, ld, beta, p.grad_weight.data_ptr<float>(), H);
  } else {
    gemm<T, T>('n', 't', H, V, rows, h, H, d, ld, beta, p.grad_weight.data_ptr<T>(), H);
  }
}

// The chunk's gradient GEMMs from its d/d(logits) rows d [n, ld_d] (T): grad_hidden rows and grad_weight.
template <typename T>
void chunk_grad_gemms(const PassArgs& p, int64_t start, int64_t n, const T* d, int64_t ld_d) {
  const int64_t H = p.hidden.size(1);
  const T* h = p.hidden.data_ptr<T>() + start * H;
  if (p.grad_hidden.defined()) {
    // grad_hidden [n, H] = D [n, V] @ weight [V, H]
    gemm<T, T>('n', 'n', H, n, p.weight.size(0), p.weight.data_ptr<T>(), H, d, ld_d, 0.f,
               p.grad_hidden.data_ptr<T>() + start * H, H);
  }
  if (p.grad_weight.defined()) {
    grad_weight_gemm<T>(p, h, d, n, ld_d, (p.accumulate_grad_weight || start > 0) ? 1.f : 0.f);
  }
}

RowArgs row_args(const PassArgs& p, int64_t ld, float inv_temp) {
  RowArgs args{p.weight.size(0), ld, 0, inv_temp, p.mode, p.targets.data_ptr<int64_t>(), nullptr,
               p.entropy.data_ptr<float>(), p.lse.data_ptr<float>(), p.coef, nullptr, nullptr};
  if (p.mode != RowMode::kGrad) {
    args.logp = p.logp.data_ptr<float>();
  } else {
    args.grad_logp = p.grad_logp.data_ptr<float>();
    args.grad_entropy = p.grad_entropy.data_ptr<float>();
  }
  return args;
}

template <typename T>
void run_pass_typed(const PassArgs& p) {
  const int64_t tokens = p.hidden.size(0), H = p.hidden.size(1), V = p.weight.size(0);
  const int64_t ld = round_up(V, kLdAlign);              // fp32 logits row stride
  const int64_t ld_grad = ld * sizeof(float) / sizeof(T);  // the same rows read as T gradients
  const int64_t rows = chunk_rows(tokens, ld, sizeof(float));
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* hidden = p.hidden.data_ptr<T>();
  const T* weight = p.weight.data_ptr<T>();
  const float inv_temp = static_cast<float>(1.0 / p.temperature);
  const bool grads = p.mode != RowMode::kStats;

  RowArgs args = row_args(p, ld, inv_temp);
  auto buffer = at::empty({rows, ld}, p.hidden.options().dtype(at::kFloat));
  float* logits = buffer.data_ptr<float>();
  const T* d = reinterpret_cast<const T*>(logits);
  for (int64_t start = 0; start < tokens; start += rows) {
    const int64_t n = std::min(rows, tokens - start);
    const T* h = hidden + start * H;
    // logits [n, V] = h [n, H] @ weight^T, fp32 out: the log-sum-exp sees unrounded logits
    gemm<T, float>('t', 'n', V, n, H, weight, H, h, H, 0.f, logits, ld);
    args.row0 = start;
    softmax_rows_kernel<T><<<n, kRowThreads, 0, stream>>>(logits, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grads) chunk_grad_gemms<T>(p, start, n, d, ld_grad);
  }
}

// Whether a gradient pass of bf16 inputs keeps its logits in bf16, its statistics still from fp32 logits: from
// the CUTLASS statistics GEMM, which also stores the bf16 copy (kStatsAndGrad; sm_90), or saved by the forward
// (kGrad). Half the bytes per row: chunks twice as tall (the weight-gradient GEMM walks its fp32 accumulator
// half as often) and a row kernel that reads 2 bytes per logit once. RINGKERN_LOGPROB_BF16_LOGITS=0 keeps the
// fp32 logits (for comparison).
bool use_bf16_logits(const PassArgs& p) {
  if (p.mode == RowMode::kStats || p.hidden.scalar_type() != at::kBFloat16) return false;
  const char* env = std::getenv("RINGKERN_LOGPROB_BF16_LOGITS");
  if (env && std::string(env) == "0") return false;
  return p.mode == RowMode::kGrad || stats_gemm_applies(p.hidden, p.weight, static_cast<float>(1.0 / p.temperature));
}

void run_bf16_logits_pass(const PassArgs& p) {
  using T = c10::BFloat16;
  const int64_t tokens = p.hidden.size(0), H = p.hidden.size(1), V = p.weight.size(0);
  const int64_t ld = round_up(V, kLdAlign);  // 16-byte aligned bf16 rows (TMA and the row kernel's packs)
  const int64_t rows = chunk_rows(tokens, ld, sizeof(T));
  auto stream = at::cuda::getCurrentCUDAStream();
  const float inv_temp = static_cast<float>(1.0 / p.temperature);
  RowArgs args = row_args(p, ld, inv_temp);
  auto buffer = at::empty({rows, ld}, p.hidden.options());
  T* logits = buffer.data_ptr<T>();
  for (int64_t start = 0; start < tokens; start += rows) {
    const int64_t n = std::min(rows, tokens - start);
    if (p.mode == RowMode::kGrad) {
      // logits [n, V] = h [n, H] @ weight^T in bf16: lse and entropy come from the forward
      gemm<T, T>('t', 'n', V, n, H, p.weight.data_ptr<T>(), H, p.hidden.data_ptr<T>() + start * H, H, 0.f, logits,
                 ld);
    } else {
      TORCH_CHECK(token_stats_sm90(p.hidden.narrow(0, start, n), p.weight, args.targets + start, inv_temp,
                                   args.logp + start, args.entropy + start, args.lse + start, stream, logits, ld),
                  "ringkern: the CUTLASS logits-statistics GEMM declined a chunk that stats_gemm_applies() accepted");
    }
    args.row0 = start;
    grad_rows_bf16_kernel<<<n, kRowThreads, 0, stream>>>(logits, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk_grad_gemms<T>(p, start, n, logits, ld);
  }
}

// Whether the statistics-only pass of bf16 inputs takes the CUTLASS GEMM that reduces its logits to per-token
// statistics in its epilogue (sm90_logits_stats.cu: no logits in memory at all). RINGKERN_LOGPROB_STATS_GEMM:
// "0" keeps the chunked cuBLAS pass (for comparison); "require" makes a decline an error (tests).
enum class StatsGemm { kOff, kPrefer, kRequire };

StatsGemm stats_gemm_mode() {
  const char* env = std::getenv("RINGKERN_LOGPROB_STATS_GEMM");
  if (env && std::string(env) == "0") return StatsGemm::kOff;
  return env && std::string(env) == "require" ? StatsGemm::kRequire : StatsGemm::kPrefer;
}

}  // namespace

void run_chunked_pass(const PassArgs& args) {
  const bool grads = args.mode != RowMode::kStats;
  if (args.hidden.size(0) == 0) {
    if (grads && args.grad_weight.defined() && !args.accumulate_grad_weight) args.grad_weight.zero_();
    return;
  }
  const StatsGemm stats_gemm = stats_gemm_mode();
  if (!grads && args.hidden.scalar_type() == at::kBFloat16 && stats_gemm != StatsGemm::kOff) {
    if (token_stats_sm90(args.hidden, args.weight, args.targets.data_ptr<int64_t>(),
                         static_cast<float>(1.0 / args.temperature), args.logp.data_ptr<float>(),
                         args.entropy.data_ptr<float>(), args.lse.data_ptr<float>(),
                         at::cuda::getCurrentCUDAStream())) {
      return;
    }
    TORCH_CHECK(stats_gemm != StatsGemm::kRequire,
                "ringkern: the CUTLASS logits-statistics GEMM declined and RINGKERN_LOGPROB_STATS_GEMM=require");
  }
  if (use_bf16_logits(args)) {
    run_bf16_logits_pass(args);
  } else if (args.hidden.scalar_type() == at::kBFloat16) {
    run_pass_typed<c10::BFloat16>(args);
  } else {
    run_pass_typed<float>(args);
  }
}

}  // namespace ringkern::logprob
