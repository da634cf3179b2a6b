// Decode attention over a KV cache (split-KV "flash decoding"): the T new tokens of each of B sequences
// attend to the cache positions <= their own. The decode step's attention is tiny (one or a few queries per
// sequence) and bandwidth-bound, so the work is spread over key splits:
//   partial kernel, grid (B * Hkv, splits), kKeys threads: the Q = G * T query rows of one kv head (G query
//     heads share it, GQA) are scored against the split's keys kKeys at a time (each tile of keys and values
//     staged in shared memory, one key per thread for the scores), with an online softmax; the block writes
//     its unnormalized (max, sum, acc[Q, D]) in fp32;
//   merge kernel, grid (B * Hkv * Q), D threads: merges the splits of one query row in a fixed order.
// Splits past a sequence's last query position exit at once (the grid is shaped by B and the cache length
// only, so a CUDA graph can capture it). Deterministic; fp32 softmax and accumulation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/check.h"

namespace ringkern {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kKeys = 64;          // keys per tile = threads per partial block
constexpr int kMaxAccPerThread = 32;  // Q * D / kKeys accumulators per thread
constexpr float kNegInf = -INFINITY;

struct Shape {
  int B, Hkv, G, T, S, D, splits, keys_per_split;
  int64_t cache_row_stride;  // elements between cache rows (the R axis)
  float scale;
};

template <int D>
__global__ void __launch_bounds__(kKeys) decode_attention_partial_kernel(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int64_t* __restrict__ positions, float* __restrict__ part_ml, float* __restrict__ part_acc, Shape sh) {
  constexpr int kCols = D / kKeys;  // columns of acc a thread owns: j, j + kKeys, ...
  constexpr int kPitch = D + 8;     // smem row pitch of the K/V tiles: 16-byte reads of 8 rows hit 32 banks
  extern __shared__ __align__(16) float smem[];
  const int Q = sh.G * sh.T;
  float* qs = smem;                  // [Q][D]
  float* ps = qs + Q * D;            // [Q][kKeys] scores, then probabilities
  float* row_m = ps + Q * kKeys;     // [Q] running max
  float* row_l = row_m + Q;          // [Q] running sum
  float* row_alpha = row_l + Q;      // [Q] rescale of this tile
  int64_t* qpos = reinterpret_cast<int64_t*>(row_alpha + Q + (Q & 1));  // [Q] (8-byte aligned)
  bf16* ks = reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(qpos + Q) + 15) & ~uintptr_t{15});  // [kKeys][kPitch]
  bf16* vs = ks + kKeys * kPitch;                    // [kKeys][kPitch] value tile

  const int b = blockIdx.x / sh.Hkv, h = blockIdx.x % sh.Hkv, split = blockIdx.y, j = threadIdx.x;
  const int64_t out_base = ((static_cast<int64_t>(blockIdx.x) * sh.splits + split) * Q);
  int64_t max_pos = 0;
  for (int t = 0; t < sh.T; ++t) max_pos = max(max_pos, positions[b * sh.T + t]);
  const int start = split * sh.keys_per_split;
  const int stop = static_cast<int>(min(static_cast<int64_t>(min(start + sh.keys_per_split, sh.S)), max_pos + 1));

  for (int i = j; i < Q; i += kKeys) {
    row_m[i] = kNegInf;
    row_l[i] = 0.f;
    qpos[i] = positions[b * sh.T + i % sh.T];  // row i = g * T + t
  }
  for (int e = j; e < Q * D; e += kKeys) {
    const int i = e / D, d = e % D, g = i / sh.T, t = i % sh.T;
    qs[e] = __bfloat162float(q[((static_cast<int64_t>(b) * sh.Hkv * sh.G + h * sh.G + g) * sh.T + t) * D + d]);
  }
  float acc[kMaxAccPerThread / kCols][kCols];
#pragma unroll
  for (int i = 0; i < kMaxAccPerThread / kCols; ++i)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.f;
  __syncthreads();

  const int64_t head_base = b * sh.cache_row_stride + static_cast<int64_t>(h) * sh.S * D;
  for (int tile = start; tile < stop; tile += kKeys) {
    // stage the tile's keys and values in shared memory: 16-byte loads, all in flight together
    const int n = min(kKeys, stop - tile);
#pragma unroll 8
    for (int e = j; e < n * (D / 8); e += kKeys) {
      const int r = e / (D / 8), c = (e % (D / 8)) * 8;
      const int64_t src = head_base + static_cast<int64_t>(tile + r) * D + c;
      *reinterpret_cast<uint4*>(ks + r * kPitch + c) = *reinterpret_cast<const uint4*>(k_cache + src);
      *reinterpret_cast<uint4*>(vs + r * kPitch + c) = *reinterpret_cast<const uint4*>(v_cache + src);
    }
    __syncthreads();
    // scores: thread j <-> key s
    const int s = tile + j;
    float score[kMaxAccPerThread / kCols];
#pragma unroll
    for (int i = 0; i < kMaxAccPerThread / kCols; ++i) score[i] = 0.f;
    if (j < n) {
#pragma unroll 4
      for (int d0 = 0; d0 < D; d0 += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(ks + j * kPitch + d0);
        const bf16* kv = reinterpret_cast<const bf16*>(&raw);
        float kf[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) kf[u] = __bfloat162float(kv[u]);
#pragma unroll
        for (int i = 0; i < kMaxAccPerThread / kCols; ++i) {
          if (i < Q) {
#pragma unroll
            for (int u = 0; u < 8; ++u) score[i] = fmaf(qs[i * D + d0 + u], kf[u], score[i]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxAccPerThread / kCols; ++i) {
      if (i < Q) ps[i * kKeys + j] = (s < stop && s <= qpos[i]) ? score[i] * sh.scale : kNegInf;
    }
    __syncthreads();
    // online softmax per query row: warp w takes rows w, w + 2, ...; a lane covers keys lane and lane + 32
    const int warp = j / 32, lane = j % 32;
    for (int i = warp; i < Q; i += kKeys / 32) {
      float a = ps[i * kKeys + lane], c = ps[i * kKeys + lane + 32];
      float m = fmaxf(a, c);
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const float m_new = fmaxf(row_m[i], m);
      const bool empty = m_new == kNegInf;  // nothing visible yet: keep zeros, avoid inf - inf
      a = empty ? 0.f : __expf(a - m_new);
      c = empty ? 0.f : __expf(c - m_new);
      float sum = a + c;
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      ps[i * kKeys + lane] = a;
      ps[i * kKeys + lane + 32] = c;
      if (lane == 0) {
        const float alpha = empty ? 1.f : __expf(row_m[i] - m_new);
        row_alpha[i] = alpha;
        row_l[i] = row_l[i] * alpha + sum;
        row_m[i] = m_new;
      }
    }
    __syncthreads();
    // acc[i][c] = acc * alpha_i + sum_key p[i][key] * v[key][j + c * kKeys]
#pragma unroll
    for (int i = 0; i < kMaxAccPerThread / kCols; ++i) {
      if (i < Q) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[i][c] *= row_alpha[i];
      }
    }
    for (int key = 0; key < n; ++key) {
      float vv[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) vv[c] = __bfloat162float(vs[key * kPitch + j + c * kKeys]);
#pragma unroll
      for (int i = 0; i < kMaxAccPerThread / kCols; ++i) {
        if (i < Q) {
          const float p = ps[i * kKeys + key];
#pragma unroll
          for (int c = 0; c < kCols; ++c) acc[i][c] = fmaf(p, vv[c], acc[i][c]);
        }
      }
    }
    __syncthreads();  // ps and the tiles are rewritten by the next tile
  }
  for (int i = j; i < Q; i += kKeys) {
    part_ml[(out_base + i) * 2] = row_m[i];
    part_ml[(out_base + i) * 2 + 1] = row_l[i];
  }
#pragma unroll
  for (int i = 0; i < kMaxAccPerThread / kCols; ++i) {
    if (i < Q) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) part_acc[(out_base + i) * D + j + c * kKeys] = acc[i][c];
    }
  }
}

// One block per (b, kv head, query row); thread d merges column d over the splits in order.
__global__ void decode_attention_merge_kernel(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                              bf16* __restrict__ out, Shape sh) {
  const int Q = sh.G * sh.T;
  const int i = blockIdx.x % Q, bh = blockIdx.x / Q, h = bh % sh.Hkv, b = bh / sh.Hkv, d = threadIdx.x;
  float m = kNegInf;
  for (int s = 0; s < sh.splits; ++s) m = fmaxf(m, part_ml[((static_cast<int64_t>(bh) * sh.splits + s) * Q + i) * 2]);
  float l = 0.f, acc = 0.f;
  for (int s = 0; s < sh.splits; ++s) {
    const int64_t r = (static_cast<int64_t>(bh) * sh.splits + s) * Q + i;
    const float ms = part_ml[r * 2];
    if (ms == kNegInf) continue;
    const float w = __expf(ms - m);
    l = fmaf(part_ml[r * 2 + 1], w, l);
    acc = fmaf(part_acc[r * sh.D + d], w, acc);
  }
  const int g = i / sh.T, t = i % sh.T;
  out[((static_cast<int64_t>(b) * sh.Hkv * sh.G + h * sh.G + g) * sh.T + t) * sh.D + d] =
      __float2bfloat16(l > 0.f ? acc / l : 0.f);
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
  RK_CHECK_ARG(Q * D <= int64_t{kMaxAccPerThread} * kKeys, "q", "G * T * D = ", Q * D, " exceeds ",
               kMaxAccPerThread * kKeys, " (too many query rows per kv head)");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  if (B == 0 || T == 0) return out;
  // enough blocks to cover the SMs twice, splits of whole tiles
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = (S + kKeys - 1) / kKeys;
  const int64_t want = std::clamp<int64_t>((2 * sms + B * Hkv - 1) / (B * Hkv), 1, tiles);
  const int64_t tiles_per_split = (tiles + want - 1) / want;
  const int64_t splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  Shape sh{static_cast<int>(B), static_cast<int>(Hkv), static_cast<int>(G), static_cast<int>(T), static_cast<int>(S),
           static_cast<int>(D), static_cast<int>(splits), static_cast<int>(tiles_per_split * kKeys),
           k_cache.stride(0), static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
  auto f32 = q.options().dtype(at::kFloat);
  auto part_ml = at::empty({B * Hkv * splits * Q * 2}, f32);
  auto part_acc = at::empty({B * Hkv * splits * Q * D}, f32);
  const size_t smem = sizeof(float) * (Q * D + Q * kKeys + 3 * Q + 1) + sizeof(int64_t) * (Q + 1) +
                      2 * sizeof(bf16) * kKeys * (D + 8) + 16;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<dim3(B * Hkv, splits), kKeys, smem, stream>>>(
        reinterpret_cast<const bf16*>(q.data_ptr()), reinterpret_cast<const bf16*>(k_cache.data_ptr()),
        reinterpret_cast<const bf16*>(v_cache.data_ptr()), positions.data_ptr<int64_t>(), part_ml.data_ptr<float>(),
        part_acc.data_ptr<float>(), sh);
  };
  if (D == 64) launch(decode_attention_partial_kernel<64>);
  else if (D == 128) launch(decode_attention_partial_kernel<128>);
  else launch(decode_attention_partial_kernel<256>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_attention_merge_kernel<<<B * Hkv * Q, D, 0, stream>>>(part_ml.data_ptr<float>(), part_acc.data_ptr<float>(),
                                                               reinterpret_cast<bf16*>(out.data_ptr()), sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace ringkern
