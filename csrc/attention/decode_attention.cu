// Decode attention over a KV cache (split-KV "flash decoding"): the T new tokens of each of B sequences
// attend to the cache positions <= their own. The decode step's attention is tiny (one or a few queries per
// sequence) and bandwidth-bound, so the keys are spread over blocks, in one launch:
//   grid (B * Hkv, splits), 4 warps: block (b, h, split) takes the Q = G * T query rows of kv head h (the G
//     query heads sharing it, GQA) against the split's keys; its warps take 16-key steps in turn. Each warp
//     copies its steps' keys and values into its own two shared-memory stages (cp.async, the next step in
//     flight while the current one is computed), scores them on the tensor cores (mma.sync m16n8k16 bf16,
//     S = Q K^T: query rows as M from registers, keys as N by ldmatrix), runs an fp32 online softmax on the
//     score fragments and accumulates O^T += V^T P^T (head dim as M by transposing ldmatrix, the bf16
//     probabilities as the B operand straight from the score fragments);
//   the block merges its warps' (max, sum, acc) in shared memory (warp order) and writes its split's partial
//     in fp32; the block that arrives last for (b, h) (an atomic counter, zeroed per call) merges the splits
//     in split order (their accumulators copied in by cp.async while the weights are computed) and writes
//     the bf16 output.
// The number of splits depends on the shapes and the SM count only, so a CUDA graph can capture the launch;
// splits wholly past a sequence's last query position exit at once and are left out of the merge.
// Deterministic (fixed reduction orders, atomics on the counter only); fp32 softmax and accumulation. Rows
// with nothing visible come out 0.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/check.h"
#include "../common/mma.h"
#include "../common/pdl.h"

namespace ringkern {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStepKeys = 16;                     // keys of one warp step (the PV mma's k)
constexpr int kTileKeys = kWarps * kStepKeys;     // keys of one block step; splits are whole tiles
constexpr int kMaxQD = 2048;                      // G * T * D limit (query rows of one block in registers)
constexpr int kMaxSplits = 64;                    // splits of one (b, kv head)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -INFINITY;

struct Params {
  const bf16* q;             // [B * Hkv, Q, D]: the G query heads x T tokens of a kv head are Q contiguous rows
  const bf16* k;             // cache rows [R, Hkv, S, D], row stride row_stride
  const bf16* v;
  const int64_t* positions;  // [B, T]
  float* part_acc;           // [B * Hkv, splits, Q, D] unnormalized
  float2* part_ml;           // [B * Hkv, splits, Q] (max, sum), base-2 exponents
  int* counters;             // [B * Hkv] arrivals, zero at launch
  bf16* out;                 // [B * Hkv, Q, D]
  int Hkv, Q, T, S, splits, keys_per_split;
  int64_t row_stride;
  float scale_log2;  // log2(e) / sqrt(D)
};

// Shared memory of a block (bytes from the dynamic base): each warp's two stages of K and V tiles while it
// attends, then the warps' results for the block merge, then for the last block's merge the splits' weights
// and a stage of their partial accumulators.
template <int D, int NR>
struct Smem {
  static constexpr int kRows = 8 * NR;         // query rows a warp holds
  static constexpr int kPitch = D + 8;         // bf16 per tile row: ldmatrix's 8 row reads hit distinct banks
  static constexpr int kTile = kStepKeys * kPitch;
  static constexpr int kAccPitch = kRows + 1;  // floats per d of a warp's O^T [D][rows]
  static constexpr size_t kStages = sizeof(bf16) * kWarps * 2 * 2 * kTile;  // [warp][stage][K, V][tile]
  static constexpr size_t kWarpMerge = sizeof(float) * kWarps * (D * kAccPitch + 3 * kRows);
  static constexpr size_t kPartials = (sizeof(float) * kRows * (kMaxSplits + 1) + 15) / 16 * 16;
  static constexpr size_t kBytes = std::max({kStages, kWarpMerge, kPartials + sizeof(float) * kRows * D});
  static constexpr size_t kPartialStage = kBytes - kPartials;  // room for at least one split's accumulator

  char* base;
  __device__ bf16* stage(int warp, int s) const { return reinterpret_cast<bf16*>(base) + (warp * 2 + s) * 2 * kTile; }
  __device__ float* acc(int warp) const { return reinterpret_cast<float*>(base) + warp * D * kAccPitch; }
  __device__ float* m(int warp) const { return reinterpret_cast<float*>(base) + kWarps * D * kAccPitch + warp * kRows; }
  __device__ float* l(int warp) const { return m(kWarps) + warp * kRows; }
  __device__ float* weight(int warp) const { return l(kWarps) + warp * kRows; }
  __device__ float* split_weight(int row) const { return reinterpret_cast<float*>(base) + row * kMaxSplits; }
  __device__ float* inv_sum() const { return split_weight(kRows); }
  __device__ float4* partials() const { return reinterpret_cast<float4*>(base + kPartials); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// waits for this thread's copies: all groups but the newest N
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Four 8x8 bf16 matrices from shared memory; lanes 8i .. 8i + 7 give the row addresses of matrix i.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* row) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  }
}

// lo, hi rounded to a bf16 pair (lo in the low half); the rounded values are added to sum, so the softmax
// denominator is the sum of the weights the PV mma multiplies by.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi, float& sum) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  sum += __low2float(p) + __high2float(p);
  return *reinterpret_cast<const uint32_t*>(&p);
}

// One warp's running attention. Lane (g = lane / 4, c = lane % 4) holds query row 8r + g of row group r (its
// Q fragments, last visible key, max and sum over the lane's keys) and the accumulator O^T[d][q] for
// d = 16i + g (+ 8), q = 8r + 2c (+ 1): acc[r][i] = {(d, q), (d, q + 1), (d + 8, q), (d + 8, q + 1)}.
template <int D, int NR>
struct WarpState {
  uint32_t q[NR][D / 16][2];  // bf16 pairs at d 16k + 2c and 16k + 8 + 2c
  int limit[NR];              // -1: nothing visible
  float m[NR], l[NR];
  float acc[NR][D / 16][4];
};

template <int D, int NR>
__device__ __forceinline__ void init_state(const Params& p, int bh, int b, int stop, WarpState<D, NR>& w) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const int row = 8 * r + g;
    const uint32_t* src = reinterpret_cast<const uint32_t*>(p.q + (static_cast<int64_t>(bh) * p.Q + row) * D) + c;
#pragma unroll
    for (int k = 0; k < D / 16; ++k)
#pragma unroll
      for (int h = 0; h < 2; ++h) w.q[r][k][h] = row < p.Q ? __ldg(src + 8 * k + 4 * h) : 0u;
    const int64_t pos = row < p.Q ? p.positions[b * p.T + row % p.T] : -1;
    w.limit[r] = static_cast<int>(std::clamp<int64_t>(pos, -1, stop - 1));
    w.m[r] = kNegInf;
    w.l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < D / 16; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) w.acc[r][i][e] = 0.f;
  }
}

// Copies keys and values [base, base + 16) into a stage (16-byte cp.async, coalesced); keys at or past stop
// are read as key stop - 1 (masked later).
template <int D, int NR>
__device__ __forceinline__ void load_stage(bf16* ks, const bf16* kh, const bf16* vh, int base, int stop) {
  constexpr int kVecs = D / 8, kPitch = Smem<D, NR>::kPitch;
  bf16* vs = ks + Smem<D, NR>::kTile;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kStepKeys * kVecs / 32; ++i) {
    const int e = lane + 32 * i, key = e / kVecs, col = e % kVecs * 8;
    const int64_t src = static_cast<int64_t>(min(base + key, stop - 1)) * D + col;
    cp_async16(ks + key * kPitch + col, kh + src);
    cp_async16(vs + key * kPitch + col, vh + src);
  }
}

// s[r][j][e] = row 8r + g . key 8j + 2c + e of the stage (S = Q K^T, K^T fragments by ldmatrix).
template <int D, int NR>
__device__ __forceinline__ void qk_scores(const WarpState<D, NR>& w, const bf16* ks, float (&s)[NR][2][2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    float c[(NR + 1) / 2][2][4] = {};  // two chains (even and odd 16-wide d chunks) halve the mma latency
#pragma unroll
    for (int k = 0; k < D / 32; ++k) {
      uint32_t b[4];  // keys 8j .. + 8 at d 32k, + 8, + 16, + 24
      ldmatrix_x4<false>(b, ks + (8 * j + lane % 8) * Smem<D, NR>::kPitch + 32 * k + 8 * (lane / 8));
#pragma unroll
      for (int mt = 0; mt < (NR + 1) / 2; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t* lo = w.q[2 * mt][2 * k + h];
          const uint32_t hi0 = 2 * mt + 1 < NR ? w.q[2 * mt + 1][2 * k + h][0] : 0u;
          const uint32_t hi1 = 2 * mt + 1 < NR ? w.q[2 * mt + 1][2 * k + h][1] : 0u;
          mma_bf16(c[mt][h], lo[0], hi0, lo[1], hi1, b[2 * h], b[2 * h + 1]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      s[r][j][0] = c[r / 2][0][2 * (r % 2)] + c[r / 2][1][2 * (r % 2)];
      s[r][j][1] = c[r / 2][0][2 * (r % 2) + 1] + c[r / 2][1][2 * (r % 2) + 1];
    }
  }
}

// Masks and scales the scores, updates each row's max and sum, rescales the accumulator and returns the
// probabilities as PV B fragments: pf[r][j] = P[row 8r + g][keys base + 8j + 2c, + 1].
template <int D, int NR>
__device__ __forceinline__ void online_softmax(WarpState<D, NR>& w, float (&s)[NR][2][2], int base, float scale_log2,
                                               uint32_t (&pf)[NR][2]) {
  const int lane = threadIdx.x % 32, c = lane % 4;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float mx = kNegInf;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[r][j][e] = base + 8 * j + 2 * c + e <= w.limit[r] ? s[r][j][e] * scale_log2 : kNegInf;
        mx = fmaxf(mx, s[r][j][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(w.m[r], mx);
    const float m_use = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: all weights 0, no inf - inf
    const float alpha = exp2f(w.m[r] - m_use);
    w.m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) pf[r][j] = pack_bf16(exp2f(s[r][j][0] - m_use), exp2f(s[r][j][1] - m_use), sum);
    w.l[r] = w.l[r] * alpha + sum;
    // the accumulator's columns q = 8r + 2c, + 1 take the rescale of the lanes holding those rows
    const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * c), a1 = __shfl_sync(0xffffffffu, alpha, 8 * c + 4);
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
      w.acc[r][i][0] *= a0;
      w.acc[r][i][1] *= a1;
      w.acc[r][i][2] *= a0;
      w.acc[r][i][3] *= a1;
    }
  }
}

// O^T += V^T P^T over the stage's 16 keys (V^T fragments by transposing ldmatrix).
template <int D, int NR>
__device__ __forceinline__ void pv_accumulate(WarpState<D, NR>& w, const bf16* vs, const uint32_t (&pf)[NR][2]) {
  const int lane = threadIdx.x % 32;
  const bf16* row = vs + (lane % 8 + 8 * (lane / 16)) * Smem<D, NR>::kPitch + 8 * (lane / 8 % 2);
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    uint32_t a[4];  // d 16i .. + 16 x keys 0 .. 16
    ldmatrix_x4<true>(a, row + 16 * i);
#pragma unroll
    for (int r = 0; r < NR; ++r) mma_bf16(w.acc[r][i], a[0], a[1], a[2], a[3], pf[r][0], pf[r][1]);
  }
}

// The warp's 16-key steps base = start + 16 warp, + 64, ... below stop, the next step's copies in flight
// while the current one is computed.
template <int D, int NR>
__device__ __forceinline__ void attend_keys(WarpState<D, NR>& w, const Smem<D, NR>& sm, const bf16* kh,
                                            const bf16* vh, int start, int stop, float scale_log2) {
  const int warp = threadIdx.x / 32;
  int base = start + warp * kStepKeys;
  if (base < stop) load_stage<D, NR>(sm.stage(warp, 0), kh, vh, base, stop);
  cp_async_commit();
  for (int i = 0; base < stop; ++i, base += kTileKeys) {
    if (base + kTileKeys < stop) load_stage<D, NR>(sm.stage(warp, (i + 1) % 2), kh, vh, base + kTileKeys, stop);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();  // the stage's copies by all lanes are complete and visible
    const bf16* ks = sm.stage(warp, i % 2);
    float s[NR][2][2];
    qk_scores(w, ks, s);
    uint32_t pf[NR][2];
    online_softmax(w, s, base, scale_log2, pf);
    pv_accumulate(w, ks + Smem<D, NR>::kTile, pf);
    __syncwarp();  // all lanes are done with the stage before it is refilled
  }
}

// The warp's state into shared memory: per row (max, sum over the row's lanes) and O^T[d][q].
template <int D, int NR>
__device__ __forceinline__ void store_warp(WarpState<D, NR>& w, const Smem<D, NR>& sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  float* acc = sm.acc(warp);
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float l = w.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (c == 0) {
      sm.m(warp)[8 * r + g] = w.m[r];
      sm.l(warp)[8 * r + g] = l;
    }
#pragma unroll
    for (int i = 0; i < D / 16; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        acc[(16 * i + g + 8 * (e / 2)) * Smem<D, NR>::kAccPitch + 8 * r + 2 * c + e % 2] = w.acc[r][i][e];
  }
}

// Merges the warps in warp order into the split's partial (part_ml, part_acc).
template <int D, int NR>
__device__ __forceinline__ void write_partial(const Params& p, int64_t part, const Smem<D, NR>& sm) {
  const int tid = threadIdx.x;
  if (tid < p.Q) {
    float m = kNegInf;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sm.m(w)[tid]);
    const float m_use = m == kNegInf ? 0.f : m;
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(sm.m(w)[tid] - m_use);
      sm.weight(w)[tid] = weight;
      l = fmaf(weight, sm.l(w)[tid], l);
    }
    p.part_ml[part * p.Q + tid] = make_float2(m, l);
  }
  __syncthreads();
  float* dst = p.part_acc + part * p.Q * D;
  for (int e = tid; e < p.Q * D; e += kThreads) {
    const int row = e / D, d = e % D;
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a = fmaf(sm.weight(w)[row], sm.acc(w)[d * Smem<D, NR>::kAccPitch + row], a);
    dst[e] = a;
  }
}

// Whether this block is the last of the (b, kv head)'s n active splits to arrive. The barrier orders the
// block's partial before thread 0's release (cumulative); its acquire, then the barrier, orders the other
// splits' partials before the merge's reads (which go to L2).
__device__ __forceinline__ bool arrived_last(const Params& p, int bh, int n) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(old) : "l"(p.counters + bh) : "memory");
    last = old == n - 1;
  }
  __syncthreads();
  return last;
}

// Copies the partial accumulators of splits [s0, s0 + count) into the stage: each thread its own float4 groups
// (it reads back only those, so its own wait suffices).
template <int D>
__device__ __forceinline__ void load_partials(const Params& p, int64_t first, int s0, int count, float4* stage) {
  const int groups = p.Q * D / 4;
  for (int s = 0; s < count; ++s) {
    const float4* src = reinterpret_cast<const float4*>(p.part_acc + (first + s0 + s) * p.Q * D);
    for (int i = threadIdx.x; i < groups; i += kThreads) cp_async16(stage + s * groups + i, src + i);
  }
  cp_async_commit();
}

// Each split's weight 2^(m_s - max m) per row and the row's 1 / sum_s w_s l_s (0: nothing visible): a warp
// per row, a lane per split (splits lane, lane + 32), every (max, sum) load in flight at once.
template <int D, int NR>
__device__ __forceinline__ void split_weights(const Params& p, int64_t first, int n, const Smem<D, NR>& sm) {
  constexpr int kRowsPerWarp = Smem<D, NR>::kRows / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float2 ml[kRowsPerWarp][2];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp + kWarps * i, s = lane + 32 * h;
      ml[i][h] = row < p.Q && s < n ? __ldcg(p.part_ml + (first + s) * p.Q + row) : make_float2(kNegInf, 0.f);
    }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int row = warp + kWarps * i;
    if (row >= p.Q) break;
    float m = fmaxf(ml[i][0].x, ml[i][1].x);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float m_use = m == kNegInf ? 0.f : m;
    float l = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float weight = exp2f(ml[i][h].x - m_use);
      if (lane + 32 * h < n) sm.split_weight(row)[lane + 32 * h] = weight;
      l = fmaf(weight, ml[i][h].y, l);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) sm.inv_sum()[row] = l > 0.f ? 1.f / l : 0.f;
  }
}

// out = sum_s w_s acc_s / sum_s w_s l_s over the n active splits in split order. The first stage of
// accumulators is in flight while the weights are computed.
template <int D, int NR>
__device__ __forceinline__ void merge_splits(const Params& p, int bh, int n, const Smem<D, NR>& sm) {
  const int tid = threadIdx.x, groups = p.Q * D / 4;
  const int per_stage = static_cast<int>(Smem<D, NR>::kPartialStage / (sizeof(float4) * groups));
  const int64_t first = static_cast<int64_t>(bh) * p.splits;
  float4* stage = sm.partials();
  load_partials<D>(p, first, 0, min(per_stage, n), stage);
  split_weights(p, first, n, sm);
  __syncthreads();
  constexpr int kItems = kMaxQD / 4 / kThreads;  // float4 groups per thread
  float4 a[kItems] = {};
  for (int s0 = 0; s0 < n; s0 += per_stage) {
    const int count = min(per_stage, n - s0);
    if (s0 > 0) load_partials<D>(p, first, s0, count, stage);
    cp_async_wait<0>();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = tid + k * kThreads;
      if (i >= groups) break;
      const float* weight = sm.split_weight(i / (D / 4)) + s0;
      for (int s = 0; s < count; ++s) {
        const float4 x = stage[s * groups + i];
        const float w = weight[s];
        a[k] = make_float4(fmaf(w, x.x, a[k].x), fmaf(w, x.y, a[k].y), fmaf(w, x.z, a[k].z), fmaf(w, x.w, a[k].w));
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int i = tid + k * kThreads;
    if (i >= groups) break;
    const float inv = sm.inv_sum()[i / (D / 4)];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(a[k].x * inv, a[k].y * inv);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(a[k].z * inv, a[k].w * inv);
    reinterpret_cast<uint2*>(p.out + static_cast<int64_t>(bh) * p.Q * D)[i] =
        make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
}

template <int D, int NR>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(Params p) {
  extern __shared__ __align__(16) char smem[];
  const Smem<D, NR> sm{smem};
  allow_next_grid();
  wait_for_previous_grid();  // a programmatic dependent launch: q comes from the previous kernel
  const int bh = blockIdx.x, b = bh / p.Hkv, h = bh % p.Hkv, split = blockIdx.y;
  int64_t max_pos = -1;
  for (int t = 0; t < p.T; ++t) max_pos = max(max_pos, p.positions[b * p.T + t]);
  max_pos = min(max_pos, static_cast<int64_t>(p.S - 1));
  // splits holding a visible key (split 0 always: it publishes the zeros of an empty row)
  const int active = max(1, static_cast<int>((max_pos + p.keys_per_split) / p.keys_per_split));
  if (split >= active) return;
  const int start = split * p.keys_per_split;
  const int stop = static_cast<int>(min(static_cast<int64_t>(start + p.keys_per_split), max_pos + 1));

  WarpState<D, NR> w;
  init_state(p, bh, b, stop, w);
  const int64_t head = b * p.row_stride + static_cast<int64_t>(h) * p.S * D;
  attend_keys(w, sm, p.k + head, p.v + head, start, stop, p.scale_log2);
  __syncthreads();  // every warp is done with its stages (the merge reuses their memory)
  store_warp(w, sm);
  __syncthreads();
  write_partial(p, static_cast<int64_t>(bh) * p.splits + split, sm);
  if (arrived_last(p, bh, active)) merge_splits(p, bh, active, sm);
}

// Splits per (b, kv head): about two waves of blocks over the GPU, at most kMaxSplits, and at least two
// tiles each (a warp's two steps are loaded together, so the second one costs little and halves the merge).
template <int D, int NR>
int split_count(int64_t pairs, int64_t tiles) {
  static const int blocks_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_attention_kernel<D, NR>, kThreads,
                                                                 Smem<D, NR>::kBytes));
    return std::max(n, 1);
  }();
  const int64_t slots = 2 * int64_t{blocks_per_sm} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t most = std::min<int64_t>((tiles + 1) / 2, kMaxSplits);
  return static_cast<int>(std::clamp<int64_t>((slots + pairs - 1) / pairs, 1, most));
}

template <int D, int NR>
void launch(Params p, int64_t pairs, const at::TensorOptions& options) {
  constexpr size_t smem = Smem<D, NR>::kBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(decode_attention_kernel<D, NR>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const int64_t tiles = (p.S + kTileKeys - 1) / kTileKeys;
  const int64_t want = split_count<D, NR>(pairs, tiles), tiles_per_split = (tiles + want - 1) / want;
  p.splits = static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);
  p.keys_per_split = static_cast<int>(tiles_per_split * kTileKeys);
  auto part_acc = at::empty({pairs * p.splits * p.Q * D}, options.dtype(at::kFloat));
  auto part_ml = at::empty({pairs * p.splits * p.Q * 2}, options.dtype(at::kFloat));
  auto counters = at::zeros({pairs}, options.dtype(at::kInt));
  p.part_acc = part_acc.data_ptr<float>();
  p.part_ml = reinterpret_cast<float2*>(part_ml.data_ptr<float>());
  p.counters = counters.data_ptr<int>();
  launch_dependent(decode_attention_kernel<D, NR>, dim3(static_cast<unsigned>(pairs), static_cast<unsigned>(p.splits)),
                   dim3(kThreads), smem, at::cuda::getCurrentCUDAStream(), p);
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& positions) {
  check_cuda(q, "q");
  check_dtype(q, "q", {at::kBFloat16});
  RK_CHECK_ARG(q.dim() == 4 && q.is_contiguous(), "q", "expected a contiguous [B, Hq, T, D] tensor, got ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    check_same_device(t, q, name);
    check_dtype(t, name, {at::kBFloat16});
    RK_CHECK_ARG(t.dim() == 4 && t.size(0) >= B && t.size(3) == D && Hq % t.size(1) == 0, name,
                 "expected [R >= ", B, ", Hkv dividing ", Hq, ", S, ", D, "], got ", t.sizes());
    RK_CHECK_ARG(t.stride(3) == 1 && t.stride(2) == D && t.stride(1) == t.size(2) * D, name,
                 "expected contiguous rows of [Hkv, S, D] (a row slice of the cache)");
  }
  RK_CHECK_ARG(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(), "v_cache",
               "expected k_cache's shape and strides");
  check_same_device(positions, q, "positions");
  check_dtype(positions, "positions", {at::kLong});
  RK_CHECK_ARG(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T && positions.is_contiguous(),
               "positions", "expected a contiguous [", B, ", ", T, "] tensor, got ", positions.sizes());
  const int64_t Hkv = k_cache.size(1), G = Hq / Hkv, Q = G * T, S = k_cache.size(2);
  RK_CHECK_ARG(D == 64 || D == 128 || D == 256, "q", "head dim ", D, " not supported (64, 128 or 256)");
  RK_CHECK_ARG(Q * D <= kMaxQD, "q", "G * T * D = ", Q * D, " exceeds ", kMaxQD,
               " (too many query rows per kv head)");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  if (B == 0 || T == 0) return out;
  Params p{};
  p.q = reinterpret_cast<const bf16*>(q.data_ptr());
  p.k = reinterpret_cast<const bf16*>(k_cache.data_ptr());
  p.v = reinterpret_cast<const bf16*>(v_cache.data_ptr());
  p.positions = positions.data_ptr<int64_t>();
  p.out = reinterpret_cast<bf16*>(out.data_ptr());
  p.Hkv = static_cast<int>(Hkv);
  p.Q = static_cast<int>(Q);
  p.T = static_cast<int>(T);
  p.S = static_cast<int>(S);
  p.row_stride = k_cache.stride(0);
  p.scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(D)));
  // query rows per block rounded up to 8, 16 or 32 (the row groups a warp holds)
  const int64_t pairs = B * Hkv, rows = Q <= 8 ? 8 : Q <= 16 ? 16 : 32;
  const auto& options = q.options();
  if (D == 64 && rows == 8) launch<64, 1>(p, pairs, options);
  else if (D == 64 && rows == 16) launch<64, 2>(p, pairs, options);
  else if (D == 64) launch<64, 4>(p, pairs, options);
  else if (D == 128 && rows == 8) launch<128, 1>(p, pairs, options);
  else if (D == 128) launch<128, 2>(p, pairs, options);
  else launch<256, 1>(p, pairs, options);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace ringkern
