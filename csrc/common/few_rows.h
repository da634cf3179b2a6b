// Weight-streaming tensor-core building blocks of the decode-sized GEMMs (the few-rows MoE kernels of
// csrc/moe/moe_experts.cu). A block of kMmaWarps warps computes
// kMmaRows = 16 output columns (16 weight rows, the mma's M) for up to 8 kNT activation rows (its N), the warps
// splitting K and adding their partial sums through shared memory in warp order (deterministic). Weights are
// read once with 16-byte streaming loads (kMmaUnroll 32-wide k chunks ahead); inside every 32-wide chunk both
// operands use the same permutation of k, so each lane's fragments are one 16-byte load per row (a dot product
// does not depend on the order of its terms).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "mma.h"

namespace ringkern::few_rows {

using bf16 = __nv_bfloat16;

constexpr int kMmaWarps = 4;   // K is split across the warps of a block
constexpr int kMmaUnroll = 4;  // 32-wide k chunks loaded ahead
constexpr int kMmaRows = 16;   // output columns per block (the mma's M)

// acc[a][t] += W_a [16 rows, ld ldw] x rows_t^T over kU 32-wide k chunks from k0, for kA weight tiles and kNT
// n-tiles of 8 rows (row pointers per lane: n-tile t's row lane / 4). Accumulator layout of the mma:
// acc[a][t][2h + q] is weight row lane / 4 + 8h, row 8t + 2 (lane % 4) + q.
template <int kU, int kA, int kNT>
__device__ __forceinline__ void mma_chunks(const bf16* const (&w)[kA], int64_t ldw,
                                           const bf16* const (&rows)[kNT], int k0, float (&acc)[kA][kNT][4]) {
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

// One pass over output columns n0.. n0+15 (w_rows: the first of those weight rows, row stride K) for the rows
// [r0, min(r0 + 8 kNT, end)) of act [., K]: y[p, n] = act[p, :] . w[n, :], y with row stride N.
template <int kNT>
__device__ void rows_pass(const bf16* act, const bf16* w_rows, bf16* y, float* red, int r0, int end, int N, int K,
                          int n0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
  const bf16* w[1] = {w_rows};
  const bf16* rows[kNT];
#pragma unroll
  for (int t = 0; t < kNT; ++t) rows[t] = act + static_cast<int64_t>(min(r0 + 8 * t + g, end - 1)) * K;
  float acc[1][kNT][4] = {};
  const int kw = K / kMmaWarps;
  stream_mma<1, kNT>(w, K, rows, warp * kw, (warp + 1) * kw, acc);
  reduce_warps<kNT * 4>(&acc[0][0][0], red);
  if (warp != 0) return;
#pragma unroll
  for (int t = 0; t < kNT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t p = r0 + 8 * t + 2 * c + (i & 1);
      if (p < end) y[p * N + n0 + g + 8 * (i >> 1)] = __float2bfloat16(acc[0][t][i]);
    }
  }
}

}  // namespace ringkern::few_rows
