// Routed SwiGLU experts on the device without host syncs: dispatch (moe_route.cu), a row gather into
// expert order, torch._grouped_mm for the two grouped GEMMs (device offsets, static shapes), a fused
// SwiGLU, and a fixed-order weighted gather-reduce back to token order (deterministic: no atomics).
// Very few slots (T = 1 decode): two weight-streaming kernels replace gather + GEMM + SwiGLU + GEMM (below);
// the path is chosen from static shapes only, so either path is graph-capturable.
//
// Backward (what is stored vs recomputed):
//   stored by the forward: x, weights, gate_up_out = X_sorted @ W_gu^T ([S, 2I], the pre-activation),
//     and the dispatch (sorted_slot, slot_pos, offsets; int32);
//   recomputed: X_sorted (a gather of x) and the activation silu(gate) * up (inside the SwiGLU backward);
//   never materialized: the per-slot expert outputs Y_sorted; grad of the routing weights uses
//     <dy_t, Y_sorted[p]> = <dy_t W_down[e], a_p> = <G[p], a_p> with G = dy_sorted @ W_down[e].
//   G = DY_sorted @ W_down                           grouped GEMM  [S, I]
//   dw[p] = <G[p], a_p>;  dA = w_p G;  dGU = SwiGLU'(gate_up_out) * dA;  AW = w_p a_p   (one fused kernel)
//   grad W_down[e] = DY_e^T AW_e, grad W_gu[e] = dGU_e^T X_e      k-grouped GEMMs (2D x 2D)
//   dX_sorted = dGU @ W_gu;  dx_t = sum_j dX_sorted[slot_pos[t, j]] (fixed order)
#include "moe.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "../common/check.h"

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

// a[p, i] = silu(gu[p, i]) * gu[p, I + i] in fp32, one rounding to bf16.
__global__ void swiglu_kernel(const bf16* __restrict__ gu, bf16* __restrict__ a, int64_t S, int I) {
  const int64_t vecs_per_row = I / kVec;
  const int64_t n = S * vecs_per_row;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < n;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = v / vecs_per_row, i = (v % vecs_per_row) * kVec;
    float g[kVec], u[kVec], out[kVec];
    load_f32(gu + p * 2 * I + i, g);
    load_f32(gu + p * 2 * I + I + i, u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = g[j] * sigmoidf(g[j]) * u[j];
    store_f32(a + p * I + i, out);
  }
}

// y[t, :] = sum_j scale_tj * rows[slot_pos[t*k + j], :], summed in j order in fp32 (scale = weights, or 1
// when weights is null). Optionally also gathers per-slot values back to token order:
// slot_values_out[t*k + j] = sorted_values[slot_pos[t*k + j]].
__global__ void combine_kernel(const bf16* __restrict__ rows, const float* __restrict__ weights,
                               const int32_t* __restrict__ slot_pos, bf16* __restrict__ y, int k, int H,
                               const float* __restrict__ sorted_values, float* __restrict__ slot_values_out) {
  const int64_t t = blockIdx.x;
  extern __shared__ int32_t pos_sh[];  // [k]
  float* w_sh = reinterpret_cast<float*>(pos_sh + k);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    pos_sh[j] = slot_pos[t * k + j];
    w_sh[j] = weights ? weights[t * k + j] : 1.f;
    if (slot_values_out) slot_values_out[t * k + j] = sorted_values[pos_sh[j]];
  }
  __syncthreads();
  for (int i = threadIdx.x * kVec; i < H; i += blockDim.x * kVec) {
    float acc[kVec] = {};
    for (int j = 0; j < k; ++j) {
      float r[kVec];
      load_f32(rows + static_cast<int64_t>(pos_sh[j]) * H + i, r);
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc[q] += w_sh[j] * r[q];
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

// Per sorted row p (one block): with g, u = gate_up_out[p], a = silu(g) u, w = weights[sorted_slot[p]]:
//   dw_sorted[p] = <G[p], a>;  dA = w G[p];  d_gate = dA u silu'(g);  d_up = dA silu(g);  aw[p] = w a.
__global__ void swiglu_backward_kernel(const bf16* __restrict__ gu, const bf16* __restrict__ G,
                                       const float* __restrict__ weights, const int32_t* __restrict__ sorted_slot,
                                       bf16* __restrict__ dgu, bf16* __restrict__ aw, float* __restrict__ dw_sorted,
                                       int I) {
  __shared__ float scratch[32];
  const int64_t p = blockIdx.x;
  const float w = weights[sorted_slot[p]];
  const bf16* gu_row = gu + p * 2 * I;
  float dot = 0.f;
  for (int i = threadIdx.x * kVec; i < I; i += blockDim.x * kVec) {
    float g[kVec], u[kVec], dg[kVec], d_gate[kVec], d_up[kVec], a_w[kVec];
    load_f32(gu_row + i, g);
    load_f32(gu_row + I + i, u);
    load_f32(G + p * I + i, dg);
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      const float sig = sigmoidf(g[q]);
      const float silu = g[q] * sig;
      const float a = silu * u[q];
      const float da = w * dg[q];
      dot += dg[q] * a;
      d_gate[q] = da * u[q] * sig * (1.f + g[q] * (1.f - sig));
      d_up[q] = da * silu;
      a_w[q] = w * a;
    }
    store_f32(dgu + p * 2 * I + i, d_gate);
    store_f32(dgu + p * 2 * I + I + i, d_up);
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
// Decode-sized batches put a handful of rows on each expert, so the GEMMs are weight-bandwidth bound:
// these kernels stream each touched expert's weights once (16-byte loads, several in flight per lane) and
// apply them to the expert's rows, up to kSmallRows at a time, staged in shared memory. Block (n-tile, p)
// works when sorted slot p is the first of its expert's run and exits at once otherwise. The first fuses the row gather and the SwiGLU; the second writes Y_sorted.

constexpr int kSmallRows = 8;    // rows per pass over the weights
constexpr int kSmallCols = 32;   // output columns per block (4 per warp)
constexpr int kSmallThreads = 256;
constexpr int kSmallUnroll = 4;  // 16-byte weight loads in flight per lane and weight row

__device__ __forceinline__ float dot8(const Vec8& w, const Vec8& x) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) s += __bfloat162float(w.v[i]) * __bfloat162float(x.v[i]);
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The expert rows of sorted slot p when p starts its expert's run in the sorted order (else the block has
// nothing to do): the grids run over slots, not experts, so at T = 1 no block waits on the 248 idle experts.
__device__ __forceinline__ bool expert_run(const int32_t* sorted_slot, const int32_t* expert_ids,
                                          const int32_t* offsets, int p, int& e, int& end) {
  e = expert_ids[sorted_slot[p]];
  if (p > 0 && expert_ids[sorted_slot[p - 1]] == e) return false;
  end = offsets[e];
  return true;
}

// grid (I / kSmallCols, S). gate_up_out[p, n] and [p, I + n] (pre-activation), act[p, n] = silu(gate) * up.
// K = H, a multiple of kVec.
__global__ void __launch_bounds__(kSmallThreads)
small_gate_up_kernel(const bf16* __restrict__ x, const int32_t* __restrict__ sorted_slot,
                     const int32_t* __restrict__ expert_ids, const int32_t* __restrict__ offsets,
                     const bf16* __restrict__ w_gu, bf16* __restrict__ gate_up_out, bf16* __restrict__ act, int k, int H,
                     int I) {
  extern __shared__ __align__(16) unsigned char small_smem[];
  bf16* xs = reinterpret_cast<bf16*>(small_smem);                                      // [kSmallRows][H]
  float* out_sh = reinterpret_cast<float*>(small_smem + sizeof(bf16) * kSmallRows * H);  // [2][kSmallRows][cols]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, begin = blockIdx.y;
  int e, end;
  if (!expert_run(sorted_slot, expert_ids, offsets, begin, e, end)) return;
  const int n0 = blockIdx.x * kSmallCols;
  const bf16* w_e = w_gu + static_cast<int64_t>(e) * 2 * I * H;
  for (int r0 = begin; r0 < end; r0 += kSmallRows) {
    const int rows = min(kSmallRows, end - r0);
    __syncthreads();  // previous pass done with xs and out_sh
    for (int i = threadIdx.x; i < rows * (H / kVec); i += blockDim.x) {
      const int r = i / (H / kVec), v = i % (H / kVec);
      const int64_t t = sorted_slot[r0 + r] / k;
      reinterpret_cast<Vec8*>(xs + r * H)[v] = reinterpret_cast<const Vec8*>(x + t * H)[v];
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kSmallCols / 8; ++c) {
      const int col = warp * (kSmallCols / 8) + c;
      const Vec8* wg = reinterpret_cast<const Vec8*>(w_e + static_cast<int64_t>(n0 + col) * H);
      const Vec8* wu = reinterpret_cast<const Vec8*>(w_e + static_cast<int64_t>(I + n0 + col) * H);
      float acc_g[kSmallRows] = {}, acc_u[kSmallRows] = {};
      for (int v0 = lane; v0 < H / kVec; v0 += 32 * kSmallUnroll) {
        Vec8 g[kSmallUnroll], u[kSmallUnroll];
#pragma unroll
        for (int q = 0; q < kSmallUnroll; ++q) {
          if (v0 + 32 * q < H / kVec) {
            g[q] = wg[v0 + 32 * q];
            u[q] = wu[v0 + 32 * q];
          }
        }
#pragma unroll
        for (int r = 0; r < kSmallRows; ++r) {
          if (r < rows) {
#pragma unroll
            for (int q = 0; q < kSmallUnroll; ++q) {
              if (v0 + 32 * q < H / kVec) {
                const Vec8 xv = reinterpret_cast<const Vec8*>(xs + r * H)[v0 + 32 * q];
                acc_g[r] += dot8(g[q], xv);
                acc_u[r] += dot8(u[q], xv);
              }
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kSmallRows; ++r) {
        if (r < rows) {
          const float sg = warp_sum(acc_g[r]), su = warp_sum(acc_u[r]);
          if (lane == 0) {
            out_sh[r * kSmallCols + col] = sg;
            out_sh[(kSmallRows + r) * kSmallCols + col] = su;
          }
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * kSmallCols; i += blockDim.x) {
      const int r = i / kSmallCols, col = i % kSmallCols;
      const float g = out_sh[r * kSmallCols + col], u = out_sh[(kSmallRows + r) * kSmallCols + col];
      const int64_t p = r0 + r;
      gate_up_out[p * 2 * I + n0 + col] = __float2bfloat16(g);
      gate_up_out[p * 2 * I + I + n0 + col] = __float2bfloat16(u);
      // Same rounding as the grouped path: the activation is taken from the bf16 pre-activation.
      const float gb = __bfloat162float(__float2bfloat16(g)), ub = __bfloat162float(__float2bfloat16(u));
      act[p * I + n0 + col] = __float2bfloat16(gb * sigmoidf(gb) * ub);
    }
  }
}

// grid (H / kSmallCols, S). y_sorted[p, h] = act[p, :] . w_down[e, h, :]; K = I, a multiple of kVec.
__global__ void __launch_bounds__(kSmallThreads)
small_down_kernel(const bf16* __restrict__ act, const int32_t* __restrict__ sorted_slot,
                  const int32_t* __restrict__ expert_ids, const int32_t* __restrict__ offsets,
                  const bf16* __restrict__ w_down, bf16* __restrict__ y_sorted, int H, int I) {
  extern __shared__ __align__(16) unsigned char small_smem[];
  bf16* as = reinterpret_cast<bf16*>(small_smem);                                      // [kSmallRows][I]
  float* out_sh = reinterpret_cast<float*>(small_smem + sizeof(bf16) * kSmallRows * I);  // [kSmallRows][cols]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, begin = blockIdx.y;
  int e, end;
  if (!expert_run(sorted_slot, expert_ids, offsets, begin, e, end)) return;
  const int h0 = blockIdx.x * kSmallCols;
  const bf16* w_e = w_down + static_cast<int64_t>(e) * H * I;
  for (int r0 = begin; r0 < end; r0 += kSmallRows) {
    const int rows = min(kSmallRows, end - r0);
    __syncthreads();
    for (int i = threadIdx.x; i < rows * (I / kVec); i += blockDim.x) {
      reinterpret_cast<Vec8*>(as)[i] = reinterpret_cast<const Vec8*>(act + static_cast<int64_t>(r0) * I)[i];
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kSmallCols / 8; ++c) {
      const int col = warp * (kSmallCols / 8) + c;
      const Vec8* wd = reinterpret_cast<const Vec8*>(w_e + static_cast<int64_t>(h0 + col) * I);
      float acc[kSmallRows] = {};
      for (int v0 = lane; v0 < I / kVec; v0 += 32 * kSmallUnroll) {
        Vec8 w[kSmallUnroll];
#pragma unroll
        for (int q = 0; q < kSmallUnroll; ++q) {
          if (v0 + 32 * q < I / kVec) w[q] = wd[v0 + 32 * q];
        }
#pragma unroll
        for (int r = 0; r < kSmallRows; ++r) {
          if (r < rows) {
#pragma unroll
            for (int q = 0; q < kSmallUnroll; ++q) {
              if (v0 + 32 * q < I / kVec) acc[r] += dot8(w[q], reinterpret_cast<const Vec8*>(as + r * I)[v0 + 32 * q]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kSmallRows; ++r) {
        if (r < rows) {
          const float sum = warp_sum(acc[r]);
          if (lane == 0) out_sh[r * kSmallCols + col] = sum;
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * kSmallCols; i += blockDim.x) {
      const int r = i / kSmallCols, col = i % kSmallCols;
      y_sorted[static_cast<int64_t>(r0 + r) * H + h0 + col] = __float2bfloat16(out_sh[r * kSmallCols + col]);
    }
  }
}

// Raises a kernel's dynamic shared-memory limit once per device and size (outside any graph capture
// that follows the first call, as with every other setup call here).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> raised;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = raised[{device, reinterpret_cast<const void*>(kernel)}];
  if (bytes > 48 * 1024 && bytes > current) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    current = bytes;
  }
}

// Whether the few-rows kernels take this problem: at most RINGKERN_MOE_SMALL_SLOTS token slots and sizes
// they tile. Default 128 slots (T <= 16 at top-8): measured on an H200 at Ring-flash shapes (whole routed
// path, router included), few-rows vs torch._grouped_mm path: T=1 0.247 vs 0.289 ms, T=4 0.485 vs 0.546,
// T=8 0.733 vs 0.814, T=16 1.154 vs 1.207, T=64 2.882 vs 2.140. 0 turns them off.
bool use_small_kernels(int64_t S, int64_t H, int64_t I) {
  static const int64_t fallback = 128;
  const char* env = std::getenv("RINGKERN_MOE_SMALL_SLOTS");
  const int64_t max_slots = env ? std::atoll(env) : fallback;
  const size_t smem = sizeof(bf16) * kSmallRows * H + sizeof(float) * 2 * kSmallRows * kSmallCols;
  return S <= max_slots && I % kSmallCols == 0 && H % kSmallCols == 0 && smem <= 200 * 1024;
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

// rows [S, H] -> [T, H]; see combine_kernel.
at::Tensor combine(const at::Tensor& rows, const float* weights, const at::Tensor& slot_pos, int64_t T, int64_t k,
                   const float* sorted_values, float* slot_values_out, cudaStream_t stream) {
  const int64_t H = rows.size(1);
  auto y = at::empty({T, H}, rows.options());
  if (T == 0) return y;
  const size_t smem = k * (sizeof(int32_t) + sizeof(float));
  combine_kernel<<<T, kRowThreads, smem, stream>>>(reinterpret_cast<const bf16*>(rows.data_ptr()), weights,
                                                   slot_pos.data_ptr<int32_t>(), reinterpret_cast<bf16*>(y.data_ptr()),
                                                   k, H, sorted_values, slot_values_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_forward_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj) {
  check_experts_inputs(x, weights, gate_up_proj, down_proj);
  check_same_device(expert_ids, x, "expert_ids");
  RK_CHECK_ARG(expert_ids.sizes() == weights.sizes(), "expert_ids", "expected ", weights.sizes(), ", got ",
               expert_ids.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t T = x.size(0), k = weights.size(1), E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  const int64_t S = T * k;
  auto [counts, offsets, sorted_slot, slot_pos] = moe_dispatch_cuda(expert_ids.contiguous(), E);
  if (S > 0 && use_small_kernels(S, x.size(1), I)) {
    const int64_t H = x.size(1);
    auto gate_up_out = at::empty({S, 2 * I}, x.options());  // [S, 2I]
    auto act = at::empty({S, I}, x.options());              // [S, I]
    auto y_sorted = at::empty({S, H}, x.options());         // [S, H]
    const size_t smem_a = sizeof(bf16) * kSmallRows * H + sizeof(float) * 2 * kSmallRows * kSmallCols;
    const size_t smem_b = sizeof(bf16) * kSmallRows * I + sizeof(float) * kSmallRows * kSmallCols;
    allow_dynamic_smem(small_gate_up_kernel, smem_a);
    allow_dynamic_smem(small_down_kernel, smem_b);
    const auto ids = expert_ids.to(at::kInt).contiguous();
    small_gate_up_kernel<<<dim3(I / kSmallCols, S), kSmallThreads, smem_a, stream>>>(
        reinterpret_cast<const bf16*>(x.data_ptr()), sorted_slot.data_ptr<int32_t>(), ids.data_ptr<int32_t>(),
        offsets.data_ptr<int32_t>(),
        reinterpret_cast<const bf16*>(gate_up_proj.data_ptr()), reinterpret_cast<bf16*>(gate_up_out.data_ptr()),
        reinterpret_cast<bf16*>(act.data_ptr()), static_cast<int>(k), static_cast<int>(H), static_cast<int>(I));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    small_down_kernel<<<dim3(H / kSmallCols, S), kSmallThreads, smem_b, stream>>>(
        reinterpret_cast<const bf16*>(act.data_ptr()), sorted_slot.data_ptr<int32_t>(), ids.data_ptr<int32_t>(),
        offsets.data_ptr<int32_t>(),
        reinterpret_cast<const bf16*>(down_proj.data_ptr()), reinterpret_cast<bf16*>(y_sorted.data_ptr()),
        static_cast<int>(H), static_cast<int>(I));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto y = combine(y_sorted, weights.data_ptr<float>(), slot_pos, T, k, nullptr, nullptr, stream);
    return {y, gate_up_out, sorted_slot, slot_pos, offsets};
  }
  auto x_sorted = gather_rows(x, sorted_slot, k, stream);                           // [S, H]
  auto gate_up_out = at::_grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offsets);  // [S, 2I]
  auto act = at::empty({S, I}, x.options());                                        // [S, I]
  if (S > 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::min<int64_t>((S * I / kVec + 255) / 256, 16 * sms);
    swiglu_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<const bf16*>(gate_up_out.data_ptr()),
                                              reinterpret_cast<bf16*>(act.data_ptr()), S, I);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto y_sorted = at::_grouped_mm(act, down_proj.transpose(1, 2), offsets);  // [S, H]
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

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) {
  m.impl("moe_experts_forward", &moe_experts_forward_cuda);
  m.impl("moe_experts_backward", &moe_experts_backward_cuda);
}

}  // namespace ringkern
