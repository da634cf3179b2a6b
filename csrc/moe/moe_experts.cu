// Routed SwiGLU experts on the device without host syncs: dispatch (moe_route.cu), a row gather into
// expert order, two CUTLASS grouped GEMMs (sm90_grouped_gemm.cu: SwiGLU fused into the gate_up epilogue,
// the routing weight into the down epilogue; torch._grouped_mm plus separate kernels where they decline),
// and a fixed-order gather-sum back to token order (deterministic: no atomics). Experts store their gate
// and up rows interleaved (row 2i gate_i, 2i + 1 up_i), and so do gate_up_out and its gradient.
// Few slots (decode): two weight-streaming tensor-core kernels replace gather + GEMM + SwiGLU + GEMM (below);
// the path is chosen from static shapes only, so either path is graph-capturable.
//
// Backward (what is stored vs recomputed):
//   stored by the forward: x, weights, gate_up_out = X_sorted @ W_gu^T ([S, 2I], the pre-activation),
//     and the dispatch (sorted_slot, slot_pos, offsets; int32);
//   recomputed: X_sorted (a gather of x) and the activation silu(gate) * up (inside the SwiGLU backward);
//   never materialized: the per-slot expert outputs Y_sorted; grad of the routing weights uses
//     <dy_t, Y_sorted[p]> = <dy_t W_down[e], a_p> = <G[p], a_p> with G = dy_sorted @ W_down[e].
//   G = DY_sorted @ W_down                           grouped GEMM  [S, I]  (torch._grouped_mm, as below)
//   dw[p] = <G[p], a_p>;  dA = w_p G;  dGU = SwiGLU'(gate_up_out) * dA;  AW = w_p a_p   (one fused kernel)
//   grad W_down[e] = DY_e^T AW_e, grad W_gu[e] = dGU_e^T X_e      k-grouped GEMMs (2D x 2D)
//   dX_sorted = dGU @ W_gu;  dx_t = sum_j dX_sorted[slot_pos[t, j]] (fixed order)
#include "moe.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../common/check.h"
#include "../common/mma.h"
#include "../common/pdl.h"
#include "sm90_grouped_gemm.h"

namespace ringkern {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kVec = 8;  // bf16 per 16-byte access
constexpr int kRowThreads = 128;

struct alignas(16) Vec8 {
  bf16 v[kVec];
};

__device__ __forceinline__ void load_f32(const bf16* p, float (&out)[kVec]) {
  const Vec8 raw = *reinterpret_cast<const Vec8*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = __bfloat162float(raw.v[i]);
}

__device__ __forceinline__ void store_f32(bf16* p, const float (&in)[kVec]) {
  Vec8 raw;
#pragma unroll
  for (int i = 0; i < kVec; ++i) raw.v[i] = __float2bfloat16(in[i]);
  *reinterpret_cast<Vec8*>(p) = raw;
}

// 2 kVec bf16 (kVec gate/up pairs) as fp32.
__device__ __forceinline__ void load_pairs(const bf16* p, float (&out)[2 * kVec]) {
  float lo[kVec], hi[kVec];
  load_f32(p, lo);
  load_f32(p + kVec, hi);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    out[i] = lo[i];
    out[kVec + i] = hi[i];
  }
}

__device__ __forceinline__ void store_pairs(bf16* p, const float (&in)[2 * kVec]) {
  float lo[kVec], hi[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    lo[i] = in[i];
    hi[i] = in[kVec + i];
  }
  store_f32(p, lo);
  store_f32(p + kVec, hi);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// out[p, :] = src[sorted_slot[p] / k, :]; one block per sorted row.
__global__ void gather_rows_kernel(const bf16* __restrict__ src, const int32_t* __restrict__ sorted_slot,
                                   bf16* __restrict__ out, int k, int H) {
  const int64_t p = blockIdx.x;
  const int64_t t = sorted_slot[p] / k;
  const Vec8* s = reinterpret_cast<const Vec8*>(src + t * H);
  Vec8* o = reinterpret_cast<Vec8*>(out + p * H);
  for (int i = threadIdx.x; i < H / kVec; i += blockDim.x) o[i] = s[i];
}

// a[p, i] = silu(gu[p, 2i]) * gu[p, 2i + 1] (gate and up interleaved) in fp32, one rounding to bf16.
__global__ void swiglu_kernel(const bf16* __restrict__ gu, bf16* __restrict__ a, int64_t S, int I) {
  const int64_t vecs_per_row = I / kVec;
  const int64_t n = S * vecs_per_row;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < n;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = v / vecs_per_row, i = (v % vecs_per_row) * kVec;
    float pairs[2 * kVec], out[kVec];
    load_pairs(gu + p * 2 * I + 2 * i, pairs);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = pairs[2 * j] * sigmoidf(pairs[2 * j]) * pairs[2 * j + 1];
    store_f32(a + p * I + i, out);
  }
}

// y[t, :] = sum_j scale_tj * rows[slot_pos[t*k + j], :] (+ extra[t, :]), summed in j order, then extra, in
// fp32 (scale = weights, or 1 when weights is null; extra: the shared expert's output or null). Optionally
// also gathers per-slot values back to token order: slot_values_out[t*k + j] = sorted_values[slot_pos[t*k + j]].
// Grid (T, column blocks): block (t, c) sums columns c * blockDim.x * kVec + ... of token t.
__global__ void combine_kernel(const bf16* __restrict__ rows, const float* __restrict__ weights,
                               const int32_t* __restrict__ slot_pos, const bf16* __restrict__ extra,
                               bf16* __restrict__ y, int k, int H, const float* __restrict__ sorted_values,
                               float* __restrict__ slot_values_out) {
  const int64_t t = blockIdx.x;
  extern __shared__ int32_t pos_sh[];  // [k]
  float* w_sh = reinterpret_cast<float*>(pos_sh + k);
  allow_next_grid();
  wait_for_previous_grid();
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    pos_sh[j] = slot_pos[t * k + j];
    w_sh[j] = weights ? weights[t * k + j] : 1.f;
    if (slot_values_out && blockIdx.y == 0) slot_values_out[t * k + j] = sorted_values[pos_sh[j]];
  }
  __syncthreads();
  for (int i = (blockIdx.y * blockDim.x + threadIdx.x) * kVec; i < H; i += gridDim.y * blockDim.x * kVec) {
    float acc[kVec] = {};
    for (int j = 0; j < k; ++j) {
      float r[kVec];
      load_f32(rows + static_cast<int64_t>(pos_sh[j]) * H + i, r);
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc[q] += w_sh[j] * r[q];
    }
    if (extra) {
      float r[kVec];
      load_f32(extra + t * H + i, r);
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc[q] += r[q];
    }
    store_f32(y + t * H + i, acc);
  }
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];  // fixed order: deterministic
  return total;
}

// Per sorted row p (one block): with g, u = gate_up_out[p] (interleaved), a = silu(g) u, w = weights[sorted_slot[p]]:
//   dw_sorted[p] = <G[p], a>;  dA = w G[p];  d_gate = dA u silu'(g);  d_up = dA silu(g);  aw[p] = w a.
// dgu[p] holds d_gate and d_up interleaved like gate_up_out.
__global__ void swiglu_backward_kernel(const bf16* __restrict__ gu, const bf16* __restrict__ G,
                                       const float* __restrict__ weights, const int32_t* __restrict__ sorted_slot,
                                       bf16* __restrict__ dgu, bf16* __restrict__ aw, float* __restrict__ dw_sorted,
                                       int I) {
  __shared__ float scratch[32];
  const int64_t p = blockIdx.x;
  const float w = weights[sorted_slot[p]];
  float dot = 0.f;
  for (int i = threadIdx.x * kVec; i < I; i += blockDim.x * kVec) {
    float gu_in[2 * kVec], dg[kVec], d_gu[2 * kVec], a_w[kVec];
    load_pairs(gu + p * 2 * I + 2 * i, gu_in);
    load_f32(G + p * I + i, dg);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const float g = gu_in[2 * q], u = gu_in[2 * q + 1];
      const float sig = sigmoidf(g);
      const float silu = g * sig;
      const float a = silu * u;
      const float da = w * dg[q];
      dot += dg[q] * a;
      d_gu[2 * q] = da * u * sig * (1.f + g * (1.f - sig));
      d_gu[2 * q + 1] = da * silu;
      a_w[q] = w * a;
    }
    store_pairs(dgu + p * 2 * I + 2 * i, d_gu);
    store_f32(aw + p * I + i, a_w);
  }
  dot = block_sum(dot, scratch);
  if (threadIdx.x == 0) dw_sorted[p] = dot;
}

// Zeroes the [rows_per_group * cols] slice of every group whose token count (from the cumulative
// offsets) is zero: the k-grouped weight-gradient GEMM is not promised to write groups with K = 0.
__global__ void zero_empty_groups_kernel(bf16* __restrict__ out, const int32_t* __restrict__ offsets,
                                         int64_t group_elems) {
  const int e = blockIdx.y;
  const int32_t begin = e == 0 ? 0 : offsets[e - 1];
  if (offsets[e] != begin) return;
  Vec8 zero;
#pragma unroll
  for (int i = 0; i < kVec; ++i) zero.v[i] = __float2bfloat16(0.f);
  Vec8* g = reinterpret_cast<Vec8*>(out + e * group_elems);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < group_elems / kVec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    g[i] = zero;
  }
}

void zero_empty_groups(at::Tensor& grouped, const at::Tensor& offsets, cudaStream_t stream) {
  const int64_t E = grouped.size(0), group_elems = grouped.numel() / E;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((group_elems / kVec + 255) / 256, 64)),
                  static_cast<unsigned>(E));
  zero_empty_groups_kernel<<<grid, 256, 0, stream>>>(reinterpret_cast<bf16*>(grouped.data_ptr()),
                                                     offsets.data_ptr<int32_t>(), group_elems);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------ few tokens per expert
// Decode-sized batches put a handful of rows on each expert, so both GEMMs are bound by reading the touched
// experts' weights. These kernels read each touched expert's weights once, with 16-byte streaming loads
// (16 in flight per lane, the next group of chunks prefetched into L2), and multiply on the tensor cores with the
// weights as the wide operand: mma.sync m16n8k16 with A = 16 weight rows (output columns) x 16 k and
// B = 16 k x 8 of the expert's rows. Inside every 32-wide k chunk both operands use the same permutation of k,
// chosen so that each lane's fragments are one 16-byte load per row (a dot product does not depend on the order
// of its terms). Grid: (16-column tiles, min(S, E)); block y takes the y-th touched expert of the dispatch's
// compact list and exits when there are fewer. Its warps split K and add their partial sums through shared
// memory in a fixed order (deterministic). The first kernel fuses the row gather and the SwiGLU, the second
// writes Y_sorted for the combine.

constexpr int kMmaWarps = 4;   // K is split across the warps of a block
constexpr int kMmaUnroll = 4;  // 32-wide k chunks loaded ahead
constexpr int kMmaRows = 16;   // output columns per block (the mma's M)

// acc[a][t] += W_a [16 rows, ld ldw] x rows_t^T over kU 32-wide k chunks from k0, for kA weight tiles and kNT
// n-tiles of 8 rows (row pointers per lane: n-tile t's row lane / 4). Accumulator layout of the mma:
// acc[a][t][2h + q] is weight row lane / 4 + 8h, row 8t + 2 (lane % 4) + q.
template <int kU, int kA, int kNT>
__device__ __forceinline__ void mma_chunks(const bf16* const (&w)[kA], int64_t ldw, const bf16* const (&rows)[kNT],
                                           int k0, float (&acc)[kA][kNT][4]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  uint4 wa[kU][kA][2], xb[kU][kNT];
#pragma unroll
  for (int u = 0; u < kU; ++u) {  // the loads first (weights: streaming, read once; rows: read-only cache)
    const int k = k0 + 32 * u + 8 * c;
#pragma unroll
    for (int a = 0; a < kA; ++a) {
#pragma unroll
      for (int h = 0; h < 2; ++h) wa[u][a][h] = __ldcs(reinterpret_cast<const uint4*>(w[a] + (g + 8 * h) * ldw + k));
    }
#pragma unroll
    for (int t = 0; t < kNT; ++t) xb[u][t] = __ldg(reinterpret_cast<const uint4*>(rows[t] + k));
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
#pragma unroll
    for (int a = 0; a < kA; ++a) {
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
        const uint4 &lo = wa[u][a][0], &hi = wa[u][a][1], &x = xb[u][t];
        mma_bf16(acc[a][t], lo.x, hi.x, lo.y, hi.y, x.x, x.y);
        mma_bf16(acc[a][t], lo.z, hi.z, lo.w, hi.w, x.z, x.w);
      }
    }
  }
}

// mma_chunks over k in [k_begin, k_end) (a multiple of 32 long), kMmaUnroll chunks at a time.
// Pulls into L2 the weight lines that mma_chunks<kMmaUnroll> from k0 will load (kA x 16 rows x 32 kMmaUnroll k;
// k0 a multiple of 64, so whole 128-byte lines), spread over the warp's lanes: issued one group of chunks
// ahead, so a warp's next loads find their lines in L2 instead of waiting a DRAM round trip after its MMAs.
template <int kA>
__device__ __forceinline__ void prefetch_chunks(const bf16* const (&w)[kA], int64_t ldw, int k0) {
  constexpr int kLinesPerRow = 32 * kMmaUnroll * sizeof(bf16) / 128;
  constexpr int kLines = kA * 16 * kLinesPerRow;
#pragma unroll
  for (int i = threadIdx.x % 32; i < kLines; i += 32) {
    const int a = i / (16 * kLinesPerRow), row = (i / kLinesPerRow) % 16, line = i % kLinesPerRow;
    asm volatile("prefetch.global.L2 [%0];" ::"l"(w[a] + row * ldw + k0 + line * (128 / sizeof(bf16))));
  }
}

template <int kA, int kNT>
__device__ __forceinline__ void stream_mma(const bf16* const (&w)[kA], int64_t ldw, const bf16* const (&rows)[kNT],
                                           int k_begin, int k_end, float (&acc)[kA][kNT][4]) {
  constexpr int kGroup = 32 * kMmaUnroll;
  int k0 = k_begin;
  for (; k0 + kGroup <= k_end; k0 += kGroup) {
    if (k0 + 2 * kGroup <= k_end && (k0 + kGroup) % 64 == 0) prefetch_chunks<kA>(w, ldw, k0 + kGroup);
    mma_chunks<kMmaUnroll>(w, ldw, rows, k0, acc);
  }
  for (; k0 < k_end; k0 += 32) mma_chunks<1>(w, ldw, rows, k0, acc);
}

// Adds the partial sums of warps 1.. into warp 0's (in warp order). red: (kMmaWarps - 1) * kN * 32 floats.
template <int kN>
__device__ __forceinline__ void reduce_warps(float* acc, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp 0 is done with the previous pass's partial sums
  if (warp > 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) red[((warp - 1) * kN + i) * 32 + lane] = acc[i];
  }
  __syncthreads();
  if (warp == 0) {
    for (int w = 0; w < kMmaWarps - 1; ++w) {
#pragma unroll
      for (int i = 0; i < kN; ++i) acc[i] += red[(w * kN + i) * 32 + lane];
    }
  }
}

// The block's product W_a x rows^T over K into warp 0's acc: each warp streams its 1/kMmaWarps of K
// (stream_mma), then warp 0 adds the others' partial sums (reduce_warps). Returns whether this thread is in
// warp 0, the one that holds the result.
template <int kA, int kNT>
__device__ __forceinline__ bool block_mma(const bf16* const (&w)[kA], int64_t ldw, const bf16* const (&rows)[kNT],
                                          int K, float (&acc)[kA][kNT][4], float* red) {
  const int warp = threadIdx.x / 32, kw = K / kMmaWarps;
  stream_mma<kA, kNT>(w, ldw, rows, warp * kw, (warp + 1) * kw, acc);
  reduce_warps<kA * kNT * 4>(&acc[0][0][0], red);
  return warp == 0;
}

// The expert of block y and its rows [begin, end) in sorted order; false when fewer experts are touched.
__device__ __forceinline__ bool touched_expert(const int32_t* active, const int32_t* offsets, int E, int& e,
                                               int& begin, int& end) {
  if (static_cast<int>(blockIdx.y) >= active[E]) return false;
  e = active[blockIdx.y];
  begin = e == 0 ? 0 : offsets[e - 1];
  end = offsets[e];
  return true;
}

// Calls pass(n_tiles, r0) for the expert's sorted rows [begin, end) in passes of 8 n_tiles rows, n_tiles a
// std::integral_constant <= kMaxNT: the fewest n-tiles that cover what is left.
template <int kMaxNT, typename Pass>
__device__ __forceinline__ void for_each_pass(int begin, int end, Pass&& pass) {
  for (int r0 = begin; r0 < end;) {
    const int rows = end - r0;
    if (kMaxNT >= 4 && rows > 16) {
      pass(std::integral_constant<int, 4>{}, r0);
      r0 += 32;
    } else if (kMaxNT >= 2 && rows > 8) {
      pass(std::integral_constant<int, 2>{}, r0);
      r0 += 16;
    } else {
      pass(std::integral_constant<int, 1>{}, r0);
      r0 += 8;
    }
  }
}

// The shared expert of an inference call, run by the few-rows kernels as one more block row (grid y):
// gate and up [Is, H], down [H, Is] (separate matrices, as stored), its activation [T, Is] and output
// [T, H] bf16 (added to every token by the combine). All null when there is none.
struct SharedExpert {
  const bf16 *gate = nullptr, *up = nullptr, *down = nullptr;
  bf16 *act = nullptr, *y = nullptr;
  int I = 0;
};

// One pass over intermediates j0.. j0+15 of one expert, given its 16 gate and 16 up weight rows (row stride
// ldw), for its rows [r0, min(r0 + 8 kNT, end)): row r is token sorted_slot[r] / k, or token r when
// sorted_slot is null (the shared expert). Stores act [., I] and, unless null, gate_up_out [., 2I].
template <int kNT>
__device__ void gate_up_pass(const bf16* x, const int32_t* sorted_slot, const bf16* gate, const bf16* up,
                             int64_t ldw, bf16* gate_up_out, bf16* act, float* red, int r0, int end, int k, int H,
                             int I, int j0) {
  const int lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const bf16* w[2] = {gate, up};
  const bf16* rows[kNT];
#pragma unroll
  for (int t = 0; t < kNT; ++t) {
    const int r = min(r0 + 8 * t + g, end - 1);  // past the end: any valid row, its column is not stored
    rows[t] = x + static_cast<int64_t>(sorted_slot ? sorted_slot[r] / k : r) * H;
  }
  float acc[2][kNT][4] = {};
  if (!block_mma<2, kNT>(w, ldw, rows, H, acc, red)) return;
#pragma unroll
  for (int t = 0; t < kNT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t p = r0 + 8 * t + 2 * c + (i & 1);
      const int j = j0 + g + 8 * (i >> 1);
      if (p < end) {
        // As in the CUTLASS epilogue: the activation from the fp32 accumulators.
        const float gf = acc[0][t][i], uf = acc[1][t][i];
        if (gate_up_out) {
          gate_up_out[p * 2 * I + 2 * j] = __float2bfloat16(gf);
          gate_up_out[p * 2 * I + 2 * j + 1] = __float2bfloat16(uf);
        }
        act[p * I + j] = __float2bfloat16(gf * sigmoidf(gf) * uf);
      }
    }
  }
}

// grid (max(I, Is) / 16, min(S, E) (+ 1 with a shared expert: the last block row, over all T tokens)).
// gate_up_out[p, 2j] and [p, 2j + 1] (pre-activation), act[p, j] = silu(gate) * up.
template <int kMaxNT>
__global__ void __launch_bounds__(kMmaWarps * 32)
small_gate_up_kernel(const bf16* __restrict__ x, const int32_t* __restrict__ sorted_slot,
                     const int32_t* __restrict__ offsets, const int32_t* __restrict__ active,
                     const bf16* __restrict__ w_gu, bf16* __restrict__ gate_up_out, bf16* __restrict__ act, int E,
                     int k, int T, int H, int I, SharedExpert shared) {
  __shared__ float red[(kMmaWarps - 1) * 2 * kMaxNT * 4 * 32];
  const int j0 = blockIdx.x * kMmaRows;
  allow_next_grid();
  wait_for_previous_grid();  // the dispatch and x come from the previous kernels
  if (shared.gate && blockIdx.y == gridDim.y - 1) {
    if (j0 >= shared.I) return;
    for_each_pass<kMaxNT>(0, T, [&](auto n_tiles, int r0) {
      gate_up_pass<decltype(n_tiles)::value>(x, nullptr, shared.gate + static_cast<int64_t>(j0) * H,
                                             shared.up + static_cast<int64_t>(j0) * H, H, nullptr, shared.act, red,
                                             r0, T, 1, H, shared.I, j0);
    });
    return;
  }
  int e, begin, end;
  if (j0 >= I || !touched_expert(active, offsets, E, e, begin, end)) return;
  const bf16* gate = w_gu + (static_cast<int64_t>(e) * 2 * I + 2 * j0) * H;  // rows 2j: gate_j, 2j + 1: up_j
  for_each_pass<kMaxNT>(begin, end, [&](auto n_tiles, int r0) {
    gate_up_pass<decltype(n_tiles)::value>(x, sorted_slot, gate, gate + H, 2 * static_cast<int64_t>(H),
                                           gate_up_out, act, red, r0, end, k, H, I, j0);
  });
}

// One pass over the down rows h0.. h0+15 (w: the first of them, row stride I) for activation rows
// [r0, min(r0 + 8 kNT, end)) of act [., I]; writes y [., H].
template <int kNT>
__device__ void down_pass(const bf16* act, const bf16* w_rows, bf16* y, float* red, int r0, int end, int H, int I,
                          int h0) {
  const int lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const bf16* w[1] = {w_rows};
  const bf16* rows[kNT];
#pragma unroll
  for (int t = 0; t < kNT; ++t) rows[t] = act + static_cast<int64_t>(min(r0 + 8 * t + g, end - 1)) * I;
  float acc[1][kNT][4] = {};
  if (!block_mma<1, kNT>(w, I, rows, I, acc, red)) return;
#pragma unroll
  for (int t = 0; t < kNT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t p = r0 + 8 * t + 2 * c + (i & 1);
      if (p < end) y[p * H + h0 + g + 8 * (i >> 1)] = __float2bfloat16(acc[0][t][i]);
    }
  }
}

// grid (H / 16, min(S, E) (+ 1: the shared expert, as above)). y_sorted[p, h] = act[p, :] . w_down[e, h, :];
// the shared expert's block row writes shared.y.
template <int kMaxNT>
__global__ void __launch_bounds__(kMmaWarps * 32)
small_down_kernel(const bf16* __restrict__ act, const int32_t* __restrict__ offsets,
                  const int32_t* __restrict__ active, const bf16* __restrict__ w_down, bf16* __restrict__ y_sorted,
                  int E, int T, int H, int I, SharedExpert shared) {
  __shared__ float red[(kMmaWarps - 1) * kMaxNT * 4 * 32];
  const int h0 = blockIdx.x * kMmaRows;
  allow_next_grid();
  wait_for_previous_grid();
  if (shared.down && blockIdx.y == gridDim.y - 1) {
    for_each_pass<kMaxNT>(0, T, [&](auto n_tiles, int r0) {
      down_pass<decltype(n_tiles)::value>(shared.act, shared.down + static_cast<int64_t>(h0) * shared.I, shared.y,
                                          red, r0, T, H, shared.I, h0);
    });
    return;
  }
  int e, begin, end;
  if (!touched_expert(active, offsets, E, e, begin, end)) return;
  const bf16* w_rows = w_down + (static_cast<int64_t>(e) * H + h0) * I;
  for_each_pass<kMaxNT>(begin, end, [&](auto n_tiles, int r0) {
    down_pass<decltype(n_tiles)::value>(act, w_rows, y_sorted, red, r0, end, H, I, h0);
  });
}

// Whether the few-rows kernels take this problem: at most RINGKERN_MOE_SMALL_SLOTS token slots (0 turns
// them off) and sizes they tile (K of both GEMMs split into 32-wide chunks per warp, 16-row output tiles).
// Default 2048 slots (T <= 256 at top-8): measured on an H200 at Ring-flash shapes (whole routed path,
// router included), few-rows vs torch._grouped_mm path: T=1 0.211 vs 0.278 ms, T=16 0.884 vs 1.212,
// T=64 1.579 vs 2.105, T=128 1.746 vs 2.266, T=256 1.920 vs 2.319.
bool use_small_kernels(int64_t S, int64_t H, int64_t I) {
  static const int64_t fallback = 2048;
  const char* env = std::getenv("RINGKERN_MOE_SMALL_SLOTS");
  const int64_t max_slots = env ? std::atoll(env) : fallback;
  const int64_t k_align = 32 * kMmaWarps;  // a multiple of kMmaRows, so the output tiles fit too
  static_assert((32 * kMmaWarps) % kMmaRows == 0);
  return S <= max_slots && H % k_align == 0 && I % k_align == 0;
}

// Launches the few-rows kernels: act [S, I] and y_sorted [S, H] from x (and the shared expert's act and y
// when given); rows per expert <= T, so T picks how many n-tiles a pass may take.
void run_small_kernels(const at::Tensor& x, const Dispatch& d, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj, int64_t k, bf16* gate_up_out, at::Tensor& act,
                       at::Tensor& y_sorted, const SharedExpert& shared, cudaStream_t stream) {
  const int64_t T = x.size(0), H = x.size(1), E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  const dim3 block(kMmaWarps * 32);
  const unsigned rows = static_cast<unsigned>(std::min(T * k, E) + (shared.gate ? 1 : 0));
  const unsigned gate_up_tiles = static_cast<unsigned>(std::max<int64_t>(I, shared.I) / kMmaRows);
  auto launch = [&](auto gate_up_kernel, auto down_kernel) {
    launch_dependent(gate_up_kernel, dim3(gate_up_tiles, rows), block, 0, stream,
                     reinterpret_cast<const bf16*>(x.data_ptr()), d.sorted_slot.data_ptr<int32_t>(),
                     d.offsets.data_ptr<int32_t>(), d.active.data_ptr<int32_t>(),
                     reinterpret_cast<const bf16*>(gate_up_proj.data_ptr()), gate_up_out,
                     reinterpret_cast<bf16*>(act.data_ptr()), static_cast<int>(E), static_cast<int>(k),
                     static_cast<int>(T), static_cast<int>(H), static_cast<int>(I), shared);
    launch_dependent(down_kernel, dim3(static_cast<unsigned>(H / kMmaRows), rows), block, 0, stream,
                     reinterpret_cast<const bf16*>(act.data_ptr()), d.offsets.data_ptr<int32_t>(),
                     d.active.data_ptr<int32_t>(), reinterpret_cast<const bf16*>(down_proj.data_ptr()),
                     reinterpret_cast<bf16*>(y_sorted.data_ptr()), static_cast<int>(E), static_cast<int>(T),
                     static_cast<int>(H), static_cast<int>(I), shared);
  };
  if (T <= 8) launch(small_gate_up_kernel<1>, small_down_kernel<1>);
  else if (T <= 16) launch(small_gate_up_kernel<2>, small_down_kernel<2>);
  else launch(small_gate_up_kernel<4>, small_down_kernel<4>);
}

void check_experts_inputs(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                          const at::Tensor& down_proj) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  check_dtype(x, "x", {at::kBFloat16});
  RK_CHECK_ARG(x.dim() == 2, "x", "expected [T, H], got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1);
  RK_CHECK_ARG(H % kVec == 0, "x", "expected H to be a multiple of ", kVec, ", got ", H);
  check_same_device(weights, x, "weights");
  check_contiguous(weights, "weights");
  check_dtype(weights, "weights", {at::kFloat});
  RK_CHECK_ARG(weights.dim() == 2 && weights.size(0) == T, "weights", "expected [", T, ", k], got ",
               weights.sizes());
  check_same_device(gate_up_proj, x, "gate_up_proj");
  check_contiguous(gate_up_proj, "gate_up_proj");
  check_dtype(gate_up_proj, "gate_up_proj", {at::kBFloat16});
  RK_CHECK_ARG(gate_up_proj.dim() == 3 && gate_up_proj.size(2) == H && gate_up_proj.size(1) % (2 * kVec) == 0,
               "gate_up_proj", "expected [E, 2I, ", H, "] with I a multiple of ", kVec, ", got ",
               gate_up_proj.sizes());
  const int64_t E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  check_same_device(down_proj, x, "down_proj");
  check_contiguous(down_proj, "down_proj");
  check_dtype(down_proj, "down_proj", {at::kBFloat16});
  RK_CHECK_ARG(down_proj.dim() == 3 && down_proj.size(0) == E && down_proj.size(1) == H && down_proj.size(2) == I,
               "down_proj", "expected [", E, ", ", H, ", ", I, "], got ", down_proj.sizes());
}

// check_experts_inputs plus the routing ids of a forward call: [T, k] like weights, on x's device.
void check_forward_inputs(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids,
                          const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  check_experts_inputs(x, weights, gate_up_proj, down_proj);
  check_same_device(expert_ids, x, "expert_ids");
  RK_CHECK_ARG(expert_ids.sizes() == weights.sizes(), "expert_ids", "expected ", weights.sizes(), ", got ",
               expert_ids.sizes());
}

void check_int32_vector(const at::Tensor& t, const at::Tensor& x, const char* name, int64_t n) {
  check_same_device(t, x, name);
  check_contiguous(t, name);
  check_dtype(t, name, {at::kInt});
  RK_CHECK_ARG(t.dim() == 1 && t.size(0) == n, name, "expected [", n, "], got ", t.sizes());
}

// rows of `src` [T, H] in sorted-slot order: [S, H].
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& sorted_slot, int64_t k, cudaStream_t stream) {
  const int64_t S = sorted_slot.size(0), H = src.size(1);
  auto out = at::empty({S, H}, src.options());
  if (S == 0) return out;
  gather_rows_kernel<<<S, kRowThreads, 0, stream>>>(reinterpret_cast<const bf16*>(src.data_ptr()),
                                                    sorted_slot.data_ptr<int32_t>(),
                                                    reinterpret_cast<bf16*>(out.data_ptr()), k, H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// rows [S, H] -> [T, H]; see combine_kernel. extra: null or [T, H] bf16 added to every token's sum.
at::Tensor combine(const at::Tensor& rows, const float* weights, const at::Tensor& slot_pos, int64_t T, int64_t k,
                   const float* sorted_values, float* slot_values_out, cudaStream_t stream,
                   const bf16* extra = nullptr) {
  const int64_t H = rows.size(1);
  auto y = at::empty({T, H}, rows.options());
  if (T == 0) return y;
  const size_t smem = k * (sizeof(int32_t) + sizeof(float));
  // Few tokens (decode): split each token's columns over blocks so the gathers run in parallel.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t column_blocks = T < sms ? (H + kRowThreads * kVec - 1) / (kRowThreads * kVec) : 1;
  launch_dependent(combine_kernel, dim3(static_cast<unsigned>(T), static_cast<unsigned>(column_blocks)),
                   dim3(kRowThreads), smem, stream, reinterpret_cast<const bf16*>(rows.data_ptr()), weights,
                   slot_pos.data_ptr<int32_t>(), extra, reinterpret_cast<bf16*>(y.data_ptr()), static_cast<int>(k),
                   static_cast<int>(H), sorted_values, slot_values_out);
  return y;
}

// act = SwiGLU of gate_up_out [S, 2I] (the torch._grouped_mm path's activation kernel).
void swiglu(const at::Tensor& gate_up_out, at::Tensor& act, cudaStream_t stream) {
  const int64_t S = act.size(0), I = act.size(1);
  if (S == 0) return;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((S * I / kVec + 255) / 256, 16 * sms);
  swiglu_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<const bf16*>(gate_up_out.data_ptr()),
                                            reinterpret_cast<bf16*>(act.data_ptr()), S, I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The grouped path's GEMMs: CUTLASS grouped kernels with fused epilogues (sm90_grouped_gemm.cu) up to
// kCutlassRowsPerExpert slots per expert on average, torch._grouped_mm plus separate SwiGLU and weighting
// kernels beyond (measured on an H200 at Ring-flash shapes, routed path with router: T=16384, 512 rows per
// expert, 7.00 vs 7.81 ms; T=65536, 2048 rows, 27.96 vs 25.70 ms), where the CUTLASS kernels decline the
// shapes, or with RINGKERN_MOE_CUTLASS=0. RINGKERN_MOE_CUTLASS=require takes them at any size and turns a
// decline into an error (tests use it).
enum class CutlassUse { kOff, kPrefer, kRequire };
constexpr int64_t kCutlassRowsPerExpert = 1024;

CutlassUse cutlass_use(int64_t S, int64_t E) {
  const char* env = std::getenv("RINGKERN_MOE_CUTLASS");
  if (env && std::string(env) == "require") return CutlassUse::kRequire;
  if ((env && std::string(env) == "0") || S > kCutlassRowsPerExpert * E) return CutlassUse::kOff;
  return CutlassUse::kPrefer;
}

bool checked(bool ran, CutlassUse use, const char* gemm) {
  TORCH_CHECK(ran || use != CutlassUse::kRequire, "ringkern: the CUTLASS grouped ", gemm,
              " GEMM declined these shapes and RINGKERN_MOE_CUTLASS=require");
  return ran;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_forward_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, bool atomic_combine) {
  check_forward_inputs(x, weights, expert_ids, gate_up_proj, down_proj);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t T = x.size(0), k = weights.size(1), E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  const int64_t S = T * k;
  const Dispatch d = dispatch_slots(expert_ids.contiguous(), E);
  const auto &sorted_slot = d.sorted_slot, &slot_pos = d.slot_pos, &offsets = d.offsets;
  if (S > 0 && use_small_kernels(S, x.size(1), I)) {
    auto gate_up_out = at::empty({S, 2 * I}, x.options());  // [S, 2I]
    auto act = at::empty({S, I}, x.options());              // [S, I]
    auto y_sorted = at::empty({S, x.size(1)}, x.options()); // [S, H]
    run_small_kernels(x, d, gate_up_proj, down_proj, k, reinterpret_cast<bf16*>(gate_up_out.data_ptr()), act,
                      y_sorted, SharedExpert{}, stream);
    auto y = combine(y_sorted, weights.data_ptr<float>(), slot_pos, T, k, nullptr, nullptr, stream);
    return {y, gate_up_out, sorted_slot, slot_pos, offsets};
  }
  auto x_sorted = gather_rows(x, sorted_slot, k, stream);  // [S, H]
  auto gate_up_out = at::empty({S, 2 * I}, x.options());  // [S, 2I]
  auto act = at::empty({S, I}, x.options());              // [S, I]
  const CutlassUse cutlass = cutlass_use(S, E);
  if (!(cutlass != CutlassUse::kOff &&
        checked(moe::grouped_gate_up_swiglu_sm90(x_sorted, gate_up_proj, offsets, gate_up_out, act, stream), cutlass,
                "gate_up"))) {
    gate_up_out = at::_grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offsets);
    swiglu(gate_up_out, act, stream);
  }
  // With CUTLASS the routing weights scale the down projection's rows in its epilogue; the combine only sums.
  const auto w_sorted = cutlass != CutlassUse::kOff ? weights.view(-1).index_select(0, sorted_slot)  // [S]
                                                    : at::Tensor();
  if (atomic_combine && cutlass != CutlassUse::kOff) {  // opt-in: the combine fused too (fp32 atomics)
    auto y32 = at::zeros({T, x.size(1)}, x.options().dtype(at::kFloat));
    if (checked(moe::grouped_down_combine_sm90(act, down_proj, offsets, w_sorted.data_ptr<float>(),
                                               sorted_slot.data_ptr<int32_t>(), static_cast<int>(k), y32, stream),
                cutlass, "down (atomic combine)")) {
      return {y32.to(x.scalar_type()), gate_up_out, sorted_slot, slot_pos, offsets};
    }
  }
  auto y_sorted = at::empty({S, x.size(1)}, x.options());  // [S, H]
  if (cutlass != CutlassUse::kOff &&
      checked(moe::grouped_down_sm90(act, down_proj, offsets, w_sorted.data_ptr<float>(), y_sorted, stream), cutlass,
              "down")) {
    auto y = combine(y_sorted, nullptr, slot_pos, T, k, nullptr, nullptr, stream);
    return {y, gate_up_out, sorted_slot, slot_pos, offsets};
  }
  y_sorted = at::_grouped_mm(act, down_proj.transpose(1, 2), offsets);
  auto y = combine(y_sorted, weights.data_ptr<float>(), slot_pos, T, k, nullptr, nullptr, stream);
  return {y, gate_up_out, sorted_slot, slot_pos, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& gate_up_out, const at::Tensor& sorted_slot,
    const at::Tensor& slot_pos, const at::Tensor& offsets) {
  check_experts_inputs(x, weights, gate_up_proj, down_proj);
  const int64_t T = x.size(0), k = weights.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2, S = T * k;
  check_same_device(grad_y, x, "grad_y");
  check_contiguous(grad_y, "grad_y");
  RK_CHECK_ARG(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), "grad_y", "expected ",
               x.sizes(), " ", x.scalar_type(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  check_same_device(gate_up_out, x, "gate_up_out");
  check_contiguous(gate_up_out, "gate_up_out");
  RK_CHECK_ARG(gate_up_out.dim() == 2 && gate_up_out.size(0) == S && gate_up_out.size(1) == 2 * I &&
                   gate_up_out.scalar_type() == x.scalar_type(),
               "gate_up_out", "expected [", S, ", ", 2 * I, "] ", x.scalar_type(), ", got ", gate_up_out.sizes());
  check_int32_vector(sorted_slot, x, "sorted_slot", S);
  check_int32_vector(slot_pos, x, "slot_pos", S);
  check_int32_vector(offsets, x, "offsets", E);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto grad_weights = at::empty({T, k}, weights.options());
  if (S == 0) {
    return {at::zeros_like(x), grad_weights, at::zeros_like(gate_up_proj), at::zeros_like(down_proj)};
  }
  auto dy_sorted = gather_rows(grad_y, sorted_slot, k, stream);  // [S, H]
  auto G = at::_grouped_mm(dy_sorted, down_proj, offsets);        // [S, I]
  auto dgu = at::empty({S, 2 * I}, x.options());
  auto aw = at::empty({S, I}, x.options());
  auto dw_sorted = at::empty({S}, weights.options());
  swiglu_backward_kernel<<<S, kRowThreads, 0, stream>>>(
      reinterpret_cast<const bf16*>(gate_up_out.data_ptr()), reinterpret_cast<const bf16*>(G.data_ptr()),
      weights.data_ptr<float>(), sorted_slot.data_ptr<int32_t>(), reinterpret_cast<bf16*>(dgu.data_ptr()),
      reinterpret_cast<bf16*>(aw.data_ptr()), dw_sorted.data_ptr<float>(), static_cast<int>(I));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto grad_down = at::_grouped_mm(dy_sorted.t(), aw, offsets);  // [E, H, I]
  auto x_sorted = gather_rows(x, sorted_slot, k, stream);        // [S, H]
  auto grad_gate_up = at::_grouped_mm(dgu.t(), x_sorted, offsets);  // [E, 2I, H]
  auto dx_sorted = at::_grouped_mm(dgu, gate_up_proj, offsets);     // [S, H]
  auto grad_x = combine(dx_sorted, nullptr, slot_pos, T, k, dw_sorted.data_ptr<float>(),
                        grad_weights.data_ptr<float>(), stream);
  grad_gate_up = grad_gate_up.contiguous();
  grad_down = grad_down.contiguous();
  zero_empty_groups(grad_gate_up, offsets, stream);
  zero_empty_groups(grad_down, offsets, stream);
  return {grad_x, grad_weights, grad_gate_up, grad_down};
}

void check_shared_weight(const at::Tensor& w, const at::Tensor& x, const char* name, int64_t rows, int64_t cols) {
  check_same_device(w, x, name);
  check_contiguous(w, name);
  check_dtype(w, name, {at::kBFloat16});
  RK_CHECK_ARG(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, name, "expected [", rows, ", ", cols,
               "], got ", w.sizes());
}

// Inference (no autograd): the routed experts plus the shared expert, y = moe_experts(x) + shared(x) with
// shared(x) = down(silu(gate x) * up x). On the few-rows path the shared expert is one more block row of
// both kernels and the combine adds it (fp32 sum, one rounding); otherwise the routed forward plus ATen
// matmuls for the shared MLP.
at::Tensor moe_block_inference_cuda(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids,
                                    const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                                    const at::Tensor& shared_gate, const at::Tensor& shared_up,
                                    const at::Tensor& shared_down) {
  check_forward_inputs(x, weights, expert_ids, gate_up_proj, down_proj);
  const int64_t T = x.size(0), H = x.size(1), k = weights.size(1), E = gate_up_proj.size(0);
  const int64_t I = gate_up_proj.size(1) / 2, Is = shared_gate.size(0), S = T * k;
  check_shared_weight(shared_gate, x, "shared_gate", Is, H);
  check_shared_weight(shared_up, x, "shared_up", Is, H);
  check_shared_weight(shared_down, x, "shared_down", H, Is);
  const c10::cuda::CUDAGuard guard(x.device());
  if (S > 0 && use_small_kernels(S, H, I) && Is % (32 * kMmaWarps) == 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    const Dispatch d = dispatch_slots(expert_ids.contiguous(), E);
    auto act = at::empty({S, I}, x.options());
    auto y_sorted = at::empty({S, H}, x.options());
    auto shared_act = at::empty({T, Is}, x.options());
    auto shared_y = at::empty({T, H}, x.options());
    const SharedExpert shared{reinterpret_cast<const bf16*>(shared_gate.data_ptr()),
                              reinterpret_cast<const bf16*>(shared_up.data_ptr()),
                              reinterpret_cast<const bf16*>(shared_down.data_ptr()),
                              reinterpret_cast<bf16*>(shared_act.data_ptr()), reinterpret_cast<bf16*>(shared_y.data_ptr()),
                              static_cast<int>(Is)};
    run_small_kernels(x, d, gate_up_proj, down_proj, k, nullptr, act, y_sorted, shared, stream);
    return combine(y_sorted, weights.data_ptr<float>(), d.slot_pos, T, k, nullptr, nullptr, stream,
                   reinterpret_cast<const bf16*>(shared_y.data_ptr()));
  }
  auto routed = std::get<0>(moe_experts_forward_cuda(x, weights, expert_ids, gate_up_proj, down_proj, false));
  auto h = at::silu(at::matmul(x, shared_gate.t())) * at::matmul(x, shared_up.t());
  return routed + at::matmul(h, shared_down.t());
}

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) {
  m.impl("moe_block_inference", &moe_block_inference_cuda);
  m.impl("moe_experts_forward", &moe_experts_forward_cuda);
  m.impl("moe_experts_backward", &moe_experts_backward_cuda);
}

}  // namespace ringkern
