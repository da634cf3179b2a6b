// Chunked linear + softmax over the vocabulary: the fused row kernel and the chunk loop that drives it
// between the GEMMs (see chunked_softmax.h for the data flow).
#include "chunked_softmax.h"

#include <ATen/cuda/CUDAContext.h>
#include <cooperative_groups.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "../common/blas.h"
#include "sm90_gemm.h"

namespace ringkern::logprob {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;
// Bytes of a pass's [rows, V] buffers (fp32 logits, and d when kept apart): its only large allocations.
constexpr int64_t kBufferBudgetBytes = int64_t{11} << 27;  // 1.375 GiB
constexpr int64_t kSubChunks = 4;  // fp32 logits sub-chunks per compact chunk (see ChunkPlan)
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

// Four values to 4 * sizeof(T) aligned bytes in one store.
template <typename T>
__device__ __forceinline__ void store4(T* p, const T (&v)[4]) {
  if constexpr (sizeof(T) == 2) {
    uint2 raw;
    memcpy(&raw, v, sizeof(raw));
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
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

// Merges the statistics of the whole block of kWarps warps; every thread gets the same result (fixed order).
template <int kWarps = kRowWarps>
__device__ SoftmaxStats block_merge(SoftmaxStats st, SoftmaxStats* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const SoftmaxStats other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                             __shfl_xor_sync(0xffffffffu, st.t, offset)};
    st = merge(st, other);
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = st;
  __syncthreads();
  SoftmaxStats total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = merge(total, scratch[w]);
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

// d/d(logit_i) of a*logp + b*entropy (each times inv_temp) for scaled logit z_i:
// d_i = inv_temp * (a * (onehot_i - p_i) - b * p_i * (z_i - mean_z)), p_i = exp(z_i - lse).
struct RowGrad {
  float ca, cb, lse, mean_z;
  int64_t target;
  __device__ RowGrad(float inv_temp, float a, float b, float lse_, float mean_z_, int64_t target_)
      : ca(a * inv_temp), cb(b * inv_temp), lse(lse_), mean_z(mean_z_), target(target_) {}
  __device__ __forceinline__ float operator()(float z, int64_t i) const {
    const float d = (ca == 0.f && cb == 0.f) ? 0.f : -__expf(z - lse) * fmaf(cb, z - mean_z, ca);
    return i == target ? d + ca : d;
  }
};

// Writes the row's d/d(logits) (RowGrad) from a row of fp32 logits x to out, narrowed to T. out may be x
// itself: element i of the T row starts at byte i * sizeof(T) of the fp32 row, i.e. inside fp32 element
// <= i, so each round reads its units into registers and synchronizes before any of them is overwritten.
template <typename T>
__device__ void write_row_grad(const float* x, T* out, int64_t vocab, float inv_temp, const RowGrad& grad) {
  constexpr int N = Pack<T>::kN;
  static_assert(kUnit % N == 0 && kUnit % Pack<float>::kN == 0);
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
  int64_t vocab, ld, ld_d, row0;  // ld / ld_d: row strides of the fp32 logits and of d; row0: first token
  float inv_temp;
  RowMode mode;
  const int64_t* targets;
  float *logp, *entropy, *lse;
  TokenCoef coef;
  const float *grad_logp, *grad_entropy;
};

// One block per row of the chunk: fp32 logits in, d/d(logits) in T out (d may alias the logits, see
// write_row_grad). The fallback of softmax_rows_cluster_kernel for vocabularies it cannot hold.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) softmax_rows_kernel(float* logits, T* d, RowArgs args) {
  __shared__ SoftmaxStats scratch[kRowWarps];
  const int64_t row = blockIdx.x, t = args.row0 + row;
  const float* x = logits + row * args.ld;
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
  write_row_grad<T>(x, d + row * args.ld_d, args.vocab, args.inv_temp,
                    RowGrad(args.inv_temp, a, b, lse, mean_z, target));
}

// One row per cluster of kClusterCtas blocks, the whole row held in registers: each block loads its slice of
// the fp32 logits once, the blocks merge their softmax statistics through distributed shared memory (fixed
// order: every block gets the same bits), then each writes d/d(logits) of its slice from its registers.
// The row is read from memory once, where the block kernel reads it twice (statistics, then gradient).
constexpr int kClusterCtas = 8;
constexpr int kClusterThreads = 512;
constexpr int kClusterPacks = 12;  // float4 packs per thread: rows of up to 8 * 512 * 48 = 196608 logits

struct ClusterPartial {
  SoftmaxStats st;
  float target_z;  // the scaled target logit, set by the block whose slice holds it
};

template <typename T>
__global__ void __cluster_dims__(kClusterCtas, 1, 1) __launch_bounds__(kClusterThreads)
    softmax_rows_cluster_kernel(const float* logits, T* d, RowArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ SoftmaxStats scratch[kClusterThreads / 32];
  __shared__ ClusterPartial partial;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / kClusterCtas, t = args.row0 + row;
  const float* x = logits + row * args.ld;
  const int64_t target = args.targets[t];
  // This block's packs: [p0, p1) of the row's V / 4 whole packs; the last block also takes the tail.
  const int64_t n_packs = args.vocab / 4, per_block = (n_packs + kClusterCtas - 1) / kClusterCtas;
  const int64_t p0 = min(n_packs, rank * per_block), p1 = min(n_packs, p0 + per_block);
  const int64_t e0 = 4 * p0, e1 = rank == kClusterCtas - 1 ? args.vocab : 4 * p1;  // elements of the slice
  float z[kClusterPacks][4];
#pragma unroll
  for (int j = 0; j < kClusterPacks; ++j) {
    const int64_t pk = p0 + threadIdx.x + static_cast<int64_t>(j) * kClusterThreads;
    if (pk < p1) load_scaled(x + 4 * pk, args.inv_temp, z[j]);
  }
  const int64_t tail = 4 * n_packs + threadIdx.x;  // V % 4 leftover logits, on the last block
  const bool has_tail = rank == kClusterCtas - 1 && tail < args.vocab;
  const float tail_z = has_tail ? x[tail] * args.inv_temp : 0.f;

  float lse, mean_z, a, b = 0.f;
  if (args.mode == RowMode::kGrad) {
    lse = args.lse[t];
    mean_z = lse - args.entropy[t];
    a = args.grad_logp[t];
    b = args.grad_entropy[t];
  } else {
    SoftmaxStats st;
#pragma unroll
    for (int j = 0; j < kClusterPacks; ++j) {
      if (p0 + threadIdx.x + static_cast<int64_t>(j) * kClusterThreads < p1) accumulate(st, z[j]);
    }
    if (has_tail) {
      const float zt[1] = {tail_z};
      accumulate(st, zt);
    }
    st = block_merge<kClusterThreads / 32>(st, scratch);
    if (threadIdx.x == 0) {
      partial.st = st;
      if (e0 <= target && target < e1) partial.target_z = x[target] * args.inv_temp;
    }
    cluster.sync();  // every block's partial is written
    SoftmaxStats total;
    float target_z = 0.f;
    for (int r = 0; r < kClusterCtas; ++r) {
      const ClusterPartial* other = cluster.map_shared_rank(&partial, r);
      total = merge(total, other->st);
      const int64_t r0 = min(n_packs, r * per_block) * 4;
      const int64_t r1 = r == kClusterCtas - 1 ? args.vocab : min(n_packs, r0 / 4 + per_block) * 4;
      if (r0 <= target && target < r1) target_z = other->target_z;
    }
    cluster.sync();  // no block leaves (freeing its shared memory) before all have read it
    const float log_s = logf(total.s), entropy = log_s - total.t / total.s;
    lse = total.m + log_s;
    mean_z = lse - entropy;
    const float logp = target_z - lse;
    if (rank == 0 && threadIdx.x == 0) {
      args.logp[t] = logp;
      args.entropy[t] = entropy;
      args.lse[t] = lse;
    }
    if (args.mode == RowMode::kStats) return;
    a = token_coef(args.coef, t, logp);
  }
  const RowGrad grad(args.inv_temp, a, b, lse, mean_z, target);
  T* out = d + row * args.ld_d;
#pragma unroll
  for (int j = 0; j < kClusterPacks; ++j) {
    const int64_t pk = p0 + threadIdx.x + static_cast<int64_t>(j) * kClusterThreads;
    if (pk < p1) {
      T v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = static_cast<T>(grad(z[j][q], 4 * pk + q));
      store4(out + 4 * pk, v);
    }
  }
  if (has_tail) out[tail] = static_cast<T>(grad(tail_z, tail));
#endif
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

// How a pass walks the tokens. Each chunk of `rows` tokens ends with one grad_hidden and one grad_weight GEMM
// over its d/d(logits); its logits are computed `sub_rows` at a time into the fp32 buffer. With a narrower
// input dtype the gradient modes keep d compact in its own buffer (ld_d = ld elements of T per row), so a
// chunk can be several fp32 sub-chunks tall: fewer passes of the weight-gradient GEMM over its fp32 [V, H]
// accumulator and taller grad_hidden GEMMs within the same memory. Otherwise d overwrites the logits.
struct ChunkPlan {
  int64_t rows, sub_rows;
  bool compact;
};

// Sizes within kBufferBudgetBytes (RINGKERN_LOGPROB_BUDGET_MIB overrides it for benchmarks), chunks of at
// most RINGKERN_LOGPROB_MAX_CHUNK_ROWS rows (tests use it to force many chunks on small inputs), compact
// chunks kSubChunks fp32 sub-chunks tall (RINGKERN_LOGPROB_SUB_CHUNKS); balanced and GEMM-aligned.
ChunkPlan plan_chunks(int64_t tokens, int64_t ld, int64_t d_size, bool grads) {
  const int64_t budget = env_int("RINGKERN_LOGPROB_BUDGET_MIB", kBufferBudgetBytes >> 20) << 20;
  const bool compact = grads && d_size < static_cast<int64_t>(sizeof(float));
  const int64_t subs = compact ? std::max<int64_t>(1, env_int("RINGKERN_LOGPROB_SUB_CHUNKS", kSubChunks)) : 1;
  // bytes per chunk row: its d row, plus 1 / subs of an fp32 logits row
  const int64_t row_bytes = compact ? ld * d_size + ld * static_cast<int64_t>(sizeof(float)) / subs
                                    : ld * static_cast<int64_t>(sizeof(float));
  int64_t max_rows = std::max<int64_t>(1, budget / row_bytes);
  max_rows = std::clamp<int64_t>(env_int("RINGKERN_LOGPROB_MAX_CHUNK_ROWS", max_rows), 1, max_rows);
  const int64_t align = max_rows >= kChunkRowAlign ? kChunkRowAlign : 1;
  max_rows = max_rows / align * align;
  const int64_t n_chunks = ceil_div(tokens, max_rows);
  const int64_t rows = std::min(tokens, round_up(ceil_div(tokens, n_chunks), align));
  const int64_t sub_align = rows >= subs * kChunkRowAlign ? kChunkRowAlign : 1;
  return {rows, std::min(rows, round_up(ceil_div(rows, subs), sub_align)), compact};
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

// Whether a row of V logits fits softmax_rows_cluster_kernel (else the block kernel takes it), on sm_90+.
bool use_cluster_rows(int64_t vocab) {
  static const bool sm90 = at::cuda::getCurrentDeviceProperties()->major >= 9;
  const int64_t per_block = ceil_div(vocab / 4, kClusterCtas);
  return sm90 && per_block <= static_cast<int64_t>(kClusterThreads) * kClusterPacks &&
         env_int("RINGKERN_LOGPROB_BLOCK_ROWS", 0) == 0;
}

template <typename T>
void launch_rows(float* logits, T* d, const RowArgs& args, int64_t n, cudaStream_t stream) {
  if (use_cluster_rows(args.vocab)) {
    softmax_rows_cluster_kernel<T><<<n * kClusterCtas, kClusterThreads, 0, stream>>>(logits, d, args);
  } else {
    softmax_rows_kernel<T><<<n, kRowThreads, 0, stream>>>(logits, d, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_pass_typed(const PassArgs& p) {
  const int64_t tokens = p.hidden.size(0), H = p.hidden.size(1), V = p.weight.size(0);
  const int64_t ld = round_up(V, kLdAlign);  // fp32 logits row stride
  const bool grads = p.mode != RowMode::kStats;
  const ChunkPlan plan = plan_chunks(tokens, ld, sizeof(T), grads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* hidden = p.hidden.data_ptr<T>();
  const T* weight = p.weight.data_ptr<T>();
  const float inv_temp = static_cast<float>(1.0 / p.temperature);

  auto logits_buffer = at::empty({plan.compact ? plan.sub_rows : plan.rows, ld}, p.hidden.options().dtype(at::kFloat));
  float* logits = logits_buffer.data_ptr<float>();
  at::Tensor d_buffer;  // compact d, or none: d overwrites the logits (same byte offset per row)
  if (plan.compact) d_buffer = at::empty({plan.rows, ld}, p.hidden.options());
  T* d = plan.compact ? d_buffer.data_ptr<T>() : reinterpret_cast<T*>(logits);
  const int64_t ld_d = plan.compact ? ld : ld * static_cast<int64_t>(sizeof(float)) / static_cast<int64_t>(sizeof(T));

  RowArgs args{V, ld, ld_d, 0, inv_temp, p.mode, p.targets.data_ptr<int64_t>(), nullptr, p.entropy.data_ptr<float>(),
               p.lse.data_ptr<float>(), p.coef, nullptr, nullptr};
  if (p.mode != RowMode::kGrad) {
    args.logp = p.logp.data_ptr<float>();
  } else {
    args.grad_logp = p.grad_logp.data_ptr<float>();
    args.grad_entropy = p.grad_entropy.data_ptr<float>();
  }

  for (int64_t start = 0; start < tokens; start += plan.rows) {
    const int64_t n = std::min(plan.rows, tokens - start);
    for (int64_t sub = 0; sub < n; sub += plan.sub_rows) {
      const int64_t m = std::min(plan.sub_rows, n - sub);
      // logits [m, V] = h [m, H] @ weight^T, fp32 out: the log-sum-exp sees unrounded logits
      gemm<T, float>('t', 'n', V, m, H, weight, H, hidden + (start + sub) * H, H, 0.f, logits, ld);
      args.row0 = start + sub;
      launch_rows<T>(logits, plan.compact ? d + sub * ld_d : d, args, m, stream);
    }
    if (!grads) continue;
    if (p.grad_hidden.defined()) {
      // grad_hidden [n, H] = D [n, V] @ weight [V, H]
      gemm<T, T>('n', 'n', H, n, V, weight, H, d, ld_d, 0.f, p.grad_hidden.data_ptr<T>() + start * H, H);
    }
    if (p.grad_weight.defined()) {
      grad_weight_gemm<T>(p, hidden + start * H, d, n, ld_d, (p.accumulate_grad_weight || start > 0) ? 1.f : 0.f);
    }
  }
}

}  // namespace

void run_chunked_pass(const PassArgs& args) {
  const bool grads = args.mode != RowMode::kStats;
  if (args.hidden.size(0) == 0) {
    if (grads && args.grad_weight.defined() && !args.accumulate_grad_weight) args.grad_weight.zero_();
    return;
  }
  if (args.hidden.scalar_type() == at::kBFloat16) {
    run_pass_typed<c10::BFloat16>(args);
  } else {
    run_pass_typed<float>(args);
  }
}

}  // namespace ringkern::logprob
