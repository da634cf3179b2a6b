// MoE router and dispatch kernels: fused sigmoid group-limited top-k routing (one warp per token, or one
// block per token for decode-sized calls), its backward, and the on-device stable sort of token slots by
// expert (counts, offsets, permutation).
//
// Tie-breaking matches ringkern.ops.reference.moe_route: among equal scores the lower group / expert
// index wins, and the k experts come out in descending biased score. Every kernel here is deterministic
// (integer atomics only) and none needs the host to read device memory, so all of it can be graph-captured.
#include "moe.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <climits>
#include <cstdlib>

#include "../common/blas.h"
#include "../common/check.h"
#include "../common/pdl.h"

namespace ringkern {
namespace {

constexpr int kRouteWarps = 8;  // tokens in flight per block
constexpr unsigned kFull = 0xffffffffu;

// The same formula as ATen's CUDA sigmoid (no fast math), so scores are bitwise those of torch.sigmoid.
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// "a beats b": larger value, or equal value and lower index.
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Order-preserving map of floats to unsigned keys (a < b <=> key(a) < key(b); -0 is taken as +0), so the
// warp can compare them with single-instruction reductions (__reduce_max_sync / __reduce_min_sync).
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t b = __float_as_uint(v);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

constexpr uint32_t kTakenKey = 0u;  // below every float's key (-inf maps to 0x007fffff)

// Top-2 keys of a set: merge (a1 >= a2) with (b1 >= b2).
__device__ __forceinline__ void merge_top2(uint32_t& a1, uint32_t& a2, uint32_t b1, uint32_t b2) {
  const uint32_t lo = min(a1, b1);
  a1 = max(a1, b1);
  a2 = max(lo, max(a2, b2));
}

// The routing of one token by one warp; lane l holds experts l + 32 j (j < kPerLane, E <= 32 kPerLane). Groups
// of gs = E / n_group experts: gs a multiple of 32 (a group is gs / 32 consecutive j of every lane) or a
// divisor of 32 (a group is a segment of gs lanes within one j). Every selection is a warp-wide max of order
// keys with ties broken by the lower index, so the result equals the reference's exactly. The chosen experts
// go into the block's histogram `hist`; gscore: this warp's n_group floats of shared memory. The logits row
// is read once, through L2 (ld.cg).
struct RouteArgs {
  const float* bias;
  const int32_t* replay32;
  const int64_t* replay64;
  float* weights;
  int32_t* ids_out;
  int E, n_group, topk_group, top_k;
  float scale;
  bool renormalize;
};

template <int kPerLane>
__device__ __forceinline__ void route_token(const RouteArgs& a, const float* row, int t, float* gscore, int* hist) {
  const int lane = threadIdx.x % 32;
  const bool replay = a.replay32 != nullptr || a.replay64 != nullptr;
  const int gs = a.E / a.n_group;
  int group[kPerLane];  // group of expert lane + 32 j
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) group[j] = (lane + 32 * j) / gs;
  int my_id = 0;         // lane r < top_k: the r-th chosen expert
  float my_score = 0.f;  // and its unbiased score
  if (replay) {
    if (lane < a.top_k) {
      const int64_t off = static_cast<int64_t>(t) * a.top_k + lane;
      my_id = a.replay32 ? a.replay32[off] : static_cast<int>(a.replay64[off]);
      CUDA_KERNEL_ASSERT(my_id >= 0 && my_id < a.E && "moe_route: replayed expert id out of range");
      my_score = sigmoidf(__ldcg(row + my_id));
    }
  } else {
    float score[kPerLane];
    uint32_t key[kPerLane];  // of the biased score; kTakenKey past E
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      score[j] = e < a.E ? sigmoidf(__ldcg(row + e)) : 0.f;
      key[j] = e < a.E ? order_key(score[j] + a.bias[e]) : kTakenKey;
    }
    // Group scores (the sum of the group's two largest biased scores) into shared memory.
    if (gs % 32 == 0) {  // group[j] is the same on every lane: a group is a run of consecutive j
      uint32_t t1 = kTakenKey, t2 = kTakenKey;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (32 * j < a.E) {
          merge_top2(t1, t2, key[j], kTakenKey);
          if (j == kPerLane - 1 || 32 * (j + 1) >= a.E || group[j + 1] != group[j]) {  // the group's last j
            const uint32_t m1 = __reduce_max_sync(kFull, t1);
            const int first = __ffs(__ballot_sync(kFull, t1 == m1)) - 1;
            const uint32_t m2 = __reduce_max_sync(kFull, lane == first ? t2 : t1);
            if (lane == 0) gscore[group[j]] = key_value(m1) + key_value(m2);
            t1 = t2 = kTakenKey;
          }
        }
      }
    } else {  // gs divides 32: top-2 over each segment of gs lanes
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        uint32_t t1 = key[j], t2 = kTakenKey;
        for (int offset = 1; offset < gs; offset <<= 1) {
          const uint32_t o1 = __shfl_xor_sync(kFull, t1, offset), o2 = __shfl_xor_sync(kFull, t2, offset);
          merge_top2(t1, t2, o1, o2);
        }
        if (lane % gs == 0 && lane + 32 * j < a.E) gscore[group[j]] = key_value(t1) + key_value(t2);
      }
    }
    __syncwarp();
    // Keep topk_group groups: group g is kept when fewer than topk_group groups beat it.
    unsigned long long kept = 0ull;
    for (int base = 0; base < a.n_group; base += 32) {
      const int g = base + lane;
      int rank = 0;
      if (g < a.n_group) {
        const float v = gscore[g];
        for (int h = 0; h < a.n_group; ++h) rank += beats(gscore[h], h, v, g);
      }
      kept |= static_cast<unsigned long long>(__ballot_sync(kFull, g < a.n_group && rank < a.topk_group)) << base;
    }
    __syncwarp();  // gscore is rewritten by the next token
    const uint32_t dropped = order_key(-INFINITY);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (lane + 32 * j < a.E && !((kept >> group[j]) & 1ull)) key[j] = dropped;
    }
    // top_k rounds: the largest key left, and of its holders the lowest expert index.
    for (int r = 0; r < a.top_k; ++r) {
      uint32_t head = key[0];
#pragma unroll
      for (int j = 1; j < kPerLane; ++j) head = max(head, key[j]);
      const uint32_t best = __reduce_max_sync(kFull, head);
      int mine = INT_MAX;  // this lane's lowest expert holding the best key
#pragma unroll
      for (int j = kPerLane - 1; j >= 0; --j) {
        if (key[j] == best) mine = lane + 32 * j;
      }
      const int winner = static_cast<int>(__reduce_min_sync(kFull, static_cast<unsigned>(mine)));
      float won_score = 0.f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (lane + 32 * j == winner) {
          won_score = score[j];
          key[j] = kTakenKey;
        }
      }
      won_score = __shfl_sync(kFull, won_score, winner % 32);
      if (lane == r) {
        my_id = winner;
        my_score = won_score;
      }
    }
  }
  // Weights: the unbiased scores, renormalized over the k (summed in slot order) and scaled.
  float denom = 0.f;
  for (int j = 0; j < a.top_k; ++j) denom += __shfl_sync(kFull, my_score, j);
  if (lane < a.top_k) {
    const float w = a.renormalize ? my_score / (denom + 1e-20f) : my_score;
    const int64_t off = static_cast<int64_t>(t) * a.top_k + lane;
    a.weights[off] = w * a.scale;
    a.ids_out[off] = my_id;
    atomicAdd(&hist[my_id], 1);
  }
}

// One warp per token (route_token); per-block histogram of the chosen experts in shared memory, flushed to
// `counts` (zeroed by the caller) with one atomic per bin, or, when the grid is one block (decode), stored
// into every bin of `counts` (no zero-fill needed before the launch).
template <int kPerLane>
__global__ void __launch_bounds__(kRouteWarps * 32, 4)
moe_route_kernel(const float* __restrict__ logits, RouteArgs a, int32_t* __restrict__ counts, int T) {
  extern __shared__ int smem[];
  int* hist = smem;                                          // [E]
  float* gscore_all = reinterpret_cast<float*>(smem + a.E);  // [kRouteWarps][n_group]
  const int warp = threadIdx.x / 32;
  for (int e = threadIdx.x; e < a.E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int t = blockIdx.x * kRouteWarps + warp; t < T; t += gridDim.x * kRouteWarps) {
    route_token<kPerLane>(a, logits + static_cast<int64_t>(t) * a.E, t, gscore_all + warp * a.n_group, hist);
    __syncwarp();
  }
  __syncthreads();
  for (int e = threadIdx.x; e < a.E; e += blockDim.x) {
    if (gridDim.x == 1) counts[e] = hist[e];
    else if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
  }
}

// Decode-sized routing (a few tokens, no replay): one block per token, thread e holds expert e, and every
// selection is a rank (how many keys beat this one, with the index tie-break of `beats`, so ranks are unique)
// computed by short loops over shared memory. The same picks, order and weights as route_token: a group's
// top two keys are its ranks 0 and 1; the kept experts' ranks among the candidates (those of kept groups
// ranked below top_k in their group) are their slots; the weights sum the slots in slot order. One warp per
// token instead (moe_route_kernel) runs every selection as a chain of dependent warp reductions: measured on
// an H200 in the decode graph at T = 1, 8.3 us per call against 5.0 for this kernel. Needs E <= 1024 threads
// and enough experts in the kept groups (topk_group * E / n_group >= top_k; the caller checks). With one
// block (T = 1) every count is stored; with more they are added into zeros.
__global__ void __launch_bounds__(1024) moe_route_block_kernel(const float* __restrict__ logits, RouteArgs a,
                                                               int32_t* __restrict__ counts) {
  extern __shared__ uint32_t keys[];  // [E] order keys of the biased scores
  const int t = blockIdx.x, e = threadIdx.x, E = a.E, n_group = a.n_group, gs = E / n_group, k = a.top_k;
  float* top2 = reinterpret_cast<float*>(keys + E);  // [n_group][2]: the group's two largest biased scores
  float* gscore = top2 + 2 * n_group;                // [n_group]
  int* kept = reinterpret_cast<int*>(gscore + n_group);  // [n_group]
  float* chosen_score = reinterpret_cast<float*>(kept + n_group);  // [k], by slot
  int* n_cand = reinterpret_cast<int*>(chosen_score + k);
  int* cand = n_cand + 1;  // experts of kept groups ranked below k in their group
  const bool valid = e < E;
  const int g = valid ? e / gs : 0;
  float score = 0.f;
  uint32_t key = kTakenKey;
  if (valid) {
    score = sigmoidf(__ldcg(logits + static_cast<int64_t>(t) * E + e));
    key = order_key(score + a.bias[e]);
    keys[e] = key;
  }
  if (e == 0) *n_cand = 0;
  __syncthreads();
  auto beats_key = [&](int j) { return keys[j] > key || (keys[j] == key && j < e); };
  int group_rank = 0;
  if (valid) {
#pragma unroll 8
    for (int j = g * gs; j < (g + 1) * gs; ++j) group_rank += beats_key(j);
    if (group_rank < 2) top2[2 * g + group_rank] = key_value(key);
  }
  __syncthreads();
  if (e < n_group) gscore[e] = top2[2 * e] + top2[2 * e + 1];
  __syncthreads();
  if (e < n_group) {
    int rank = 0;
#pragma unroll 8
    for (int h = 0; h < n_group; ++h) rank += beats(gscore[h], h, gscore[e], e);
    kept[e] = rank < a.topk_group;
  }
  __syncthreads();
  const bool candidate = valid && kept[g] && group_rank < k;
  if (candidate) cand[atomicAdd(n_cand, 1)] = e;
  __syncthreads();
  int slot = k;  // past the last slot: not chosen
  if (candidate) {
    slot = 0;
    const int n = *n_cand;
#pragma unroll 8
    for (int i = 0; i < n; ++i) slot += beats_key(cand[i]);
    if (slot < k) {
      chosen_score[slot] = score;
      a.ids_out[static_cast<int64_t>(t) * k + slot] = e;
    }
  }
  if (gridDim.x == 1 && valid) counts[e] = slot < k ? 1 : 0;
  else if (slot < k) atomicAdd(&counts[e], 1);
  __syncthreads();
  if (e < k) {
    float denom = 0.f;
    for (int j = 0; j < k; ++j) denom += chosen_score[j];
    const float w = a.renormalize ? chosen_score[e] / (denom + 1e-20f) : chosen_score[e];
    a.weights[static_cast<int64_t>(t) * k + e] = w * a.scale;
  }
}

// Whether moe_route_block_kernel takes a call: no replay, T <= 64 (RINGKERN_MOE_ROUTE_BLOCK_TOKENS, 0 turns
// it off) and configurations it covers.
bool use_block_route(int64_t T, int64_t E, int64_t n_group, int64_t topk_group, int64_t top_k, bool replay) {
  const char* env = std::getenv("RINGKERN_MOE_ROUTE_BLOCK_TOKENS");
  const int64_t max_tokens = env ? std::atoll(env) : 64;
  return !replay && T >= 1 && T <= max_tokens && E <= 1024 && topk_group * (E / n_group) >= top_k;
}

// One thread per token: d w_j / d s_i = scale * (delta_ij / (S + eps) - s_j / (S + eps)^2) when
// renormalizing (S = sum of the k scores), times the sigmoid's s (1 - s) for the logit.
template <typename id_t>
__global__ void moe_route_backward_kernel(const float* __restrict__ grad_w, const float* __restrict__ logits,
                                          const id_t* __restrict__ ids, float* __restrict__ grad_logits, int T,
                                          int E, int top_k, float scale, bool renormalize) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* row = logits + static_cast<int64_t>(t) * E;
  const float* g = grad_w + static_cast<int64_t>(t) * top_k;
  const id_t* id = ids + static_cast<int64_t>(t) * top_k;
  float* out = grad_logits + static_cast<int64_t>(t) * E;
  float denom = 0.f, dot = 0.f;
  for (int j = 0; j < top_k; ++j) {
    const float s = sigmoidf(row[id[j]]);
    denom += s;
    dot += g[j] * s;
  }
  denom += 1e-20f;
  for (int j = 0; j < top_k; ++j) {
    const int e = static_cast<int>(id[j]);
    const float s = sigmoidf(row[e]);
    const float ds = renormalize ? scale * (g[j] / denom - dot / (denom * denom)) : scale * g[j];
    out[e] += ds * s * (1.f - s);
  }
}

// ---------------------------------------------------------------------------------------------- dispatch
// Slots are cut into chunks, one warp each. (1) per-chunk histograms, stored [E][chunks];
// (2) per expert, an exclusive scan over its chunks; (3) expert offsets (a scan over E);
// (4) each warp walks its chunk in slot order and places every slot at
// expert start + earlier chunks' count + rank among earlier slots of its chunk: a stable counting sort.

constexpr int kDispatchWarps = 4;

template <typename id_t>
__global__ void dispatch_histogram_kernel(const id_t* __restrict__ ids, int32_t* __restrict__ hist, int64_t S,
                                          int E, int chunk, int chunks) {
  extern __shared__ int sh_hist[];  // [kDispatchWarps][E]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.x * kDispatchWarps + warp;
  int* h = sh_hist + warp * E;
  for (int e = lane; e < E; e += 32) h[e] = 0;
  __syncwarp();
  if (c < chunks) {
    const int64_t begin = static_cast<int64_t>(c) * chunk;
    const int64_t end = min(begin + chunk, S);
    for (int64_t s = begin + lane; s < end; s += 32) {
      const int e = static_cast<int>(ids[s]);
      CUDA_KERNEL_ASSERT(e >= 0 && e < E && "moe_dispatch: expert id out of range");
      atomicAdd(&h[e], 1);
    }
  }
  __syncwarp();
  if (c < chunks) {
    for (int e = lane; e < E; e += 32) hist[static_cast<int64_t>(e) * chunks + c] = h[e];
  }
}

constexpr int kScanThreads = 256;
constexpr int kScanItems = 4;  // chunks per thread: at most kScanThreads * kScanItems chunks

// One block per expert: exclusive scan of its per-chunk counts (in place), total into counts[e].
__global__ void dispatch_chunk_scan_kernel(int32_t* __restrict__ hist, int32_t* __restrict__ counts, int chunks) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int32_t* row = hist + static_cast<int64_t>(blockIdx.x) * chunks;
  int items[kScanItems];
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int c = threadIdx.x * kScanItems + i;
    items[i] = c < chunks ? row[c] : 0;
  }
  int total = 0;
  Scan(tmp).ExclusiveSum(items, items, total);
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int c = threadIdx.x * kScanItems + i;
    if (c < chunks) row[c] = items[i];
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

constexpr int kOffsetThreads = 1024;  // E <= 1024

// offsets = inclusive scan of counts; active = the experts with tokens, compacted in order, then their number.
__global__ void dispatch_offsets_kernel(const int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                        int32_t* __restrict__ active, int E) {
  using Scan = cub::BlockScan<int, kOffsetThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int e = threadIdx.x;
  const int count = e < E ? counts[e] : 0;
  int end, rank, touched;
  Scan(tmp).InclusiveSum(count, end);
  if (e < E) offsets[e] = end;
  __syncthreads();  // the scan storage is reused
  Scan(tmp).ExclusiveSum(count > 0 ? 1 : 0, rank, touched);
  if (count > 0) active[rank] = e;
  if (e == 0) active[E] = touched;
}

template <typename id_t>
__global__ void dispatch_scatter_kernel(const id_t* __restrict__ ids, const int32_t* __restrict__ chunk_base,
                                        const int32_t* __restrict__ counts, const int32_t* __restrict__ offsets,
                                        int32_t* __restrict__ sorted_slot, int32_t* __restrict__ slot_pos,
                                        int64_t S, int E, int chunk, int chunks) {
  extern __shared__ int sh_next[];  // [kDispatchWarps][E]: next free position per expert
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.x * kDispatchWarps + warp;
  if (c >= chunks) return;  // whole warp leaves together
  int* next = sh_next + warp * E;
  for (int e = lane; e < E; e += 32) next[e] = offsets[e] - counts[e] + chunk_base[static_cast<int64_t>(e) * chunks + c];
  __syncwarp();
  const int64_t begin = static_cast<int64_t>(c) * chunk;
  const int64_t end = min(begin + chunk, S);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t s = base + lane;
    const int e = s < end ? static_cast<int>(ids[s]) : -1;
    const unsigned same = __match_any_sync(kFull, e);
    if (e >= 0) {
      const int pos = next[e] + __popc(same & lanes_below);
      sorted_slot[pos] = static_cast<int32_t>(s);
      slot_pos[s] = pos;
    }
    __syncwarp();
    if (e >= 0 && (same >> lane) == 1u) next[e] += __popc(same);  // the group's highest lane advances it
    __syncwarp();
  }
}

// All of the above in one block when the slots make a single chunk (decode-sized calls): histogram in
// shared memory, the two scans over experts, then warp 0 places the slots in order (stable).
template <typename id_t>
__global__ void __launch_bounds__(kOffsetThreads)
dispatch_one_block_kernel(const id_t* __restrict__ ids, int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                          int32_t* __restrict__ active, int32_t* __restrict__ sorted_slot,
                          int32_t* __restrict__ slot_pos, int S, int E) {
  allow_next_grid();
  wait_for_previous_grid();  // a programmatic dependent launch: the ids come from the previous kernel
  using Scan = cub::BlockScan<int, kOffsetThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int next[kOffsetThreads];  // per expert: its count, then its next free position
  const int e = threadIdx.x;
  next[e] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < S; s += kOffsetThreads) {
    const int id = static_cast<int>(ids[s]);
    CUDA_KERNEL_ASSERT(id >= 0 && id < E && "moe_dispatch: expert id out of range");
    atomicAdd(&next[id], 1);
  }
  __syncthreads();
  const int count = e < E ? next[e] : 0;
  int end, rank, touched;
  Scan(tmp).InclusiveSum(count, end);
  if (e < E) {
    counts[e] = count;
    offsets[e] = end;
    next[e] = end - count;
  }
  __syncthreads();  // the scan storage is reused; next holds start positions
  Scan(tmp).ExclusiveSum(count > 0 ? 1 : 0, rank, touched);
  if (count > 0) active[rank] = e;
  if (e == 0) active[E] = touched;
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = 0; base < S; base += 32) {
    const int s = base + lane;
    const int id = s < S ? static_cast<int>(ids[s]) : -1;
    const unsigned same = __match_any_sync(kFull, id);
    if (id >= 0) {
      const int pos = next[id] + __popc(same & lanes_below);
      sorted_slot[pos] = s;
      slot_pos[s] = pos;
    }
    __syncwarp();
    if (id >= 0 && (same >> lane) == 1u) next[id] += __popc(same);
    __syncwarp();
  }
}

template <typename F>
void dispatch_id_type(const at::Tensor& ids, F&& f) {
  if (ids.scalar_type() == at::kInt) {
    f(ids.data_ptr<int32_t>());
  } else {
    f(ids.data_ptr<int64_t>());
  }
}

}  // namespace

static void check_route_config(int64_t E, int64_t n_group, int64_t topk_group, int64_t top_k, const char* experts_arg) {
  RK_CHECK_ARG(E >= 1 && E <= 512, experts_arg, "expected 1 <= E <= 512 experts, got ", E);
  RK_CHECK_ARG(n_group >= 1 && n_group <= 64 && E % n_group == 0 && E / n_group >= 2 &&
                   ((E / n_group) % 32 == 0 || 32 % (E / n_group) == 0),
               "n_group", "expected a divisor of E=", E, " giving groups of 2, 4, 8, 16 or a multiple of 32 experts ",
               "and n_group <= 64, got ", n_group);
  RK_CHECK_ARG(topk_group >= 1 && topk_group <= n_group, "topk_group", "expected 1..", n_group, ", got ", topk_group);
  RK_CHECK_ARG(top_k >= 1 && top_k <= 32 && top_k <= E, "top_k", "expected 1..min(32, E), got ", top_k);
}

static RouteArgs route_args(const at::Tensor& bias, const int32_t* replay32, const int64_t* replay64,
                              at::Tensor& weights, at::Tensor& ids_out, int64_t E, int64_t n_group, int64_t topk_group,
                              int64_t top_k,
                              double scale, bool renormalize) {
  return RouteArgs{bias.data_ptr<float>(), replay32, replay64, weights.data_ptr<float>(), ids_out.data_ptr<int32_t>(),
                   static_cast<int>(E), static_cast<int>(n_group), static_cast<int>(topk_group),
                   static_cast<int>(top_k), static_cast<float>(scale), renormalize};
}

// Calls f(std::integral_constant<int, kPerLane>{}) with the experts per lane that E needs.
template <typename F>
void with_lanes(int64_t E, F&& f) {
  if (E <= 32) f(std::integral_constant<int, 1>{});
  else if (E <= 64) f(std::integral_constant<int, 2>{});
  else if (E <= 128) f(std::integral_constant<int, 4>{});
  else if (E <= 256) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

// router_logits: a contiguous fp32 CUDA tensor [T, E] (checked by the forward and the backward).
static void check_router_logits(const at::Tensor& router_logits) {
  check_cuda(router_logits, "router_logits");
  check_contiguous(router_logits, "router_logits");
  check_dtype(router_logits, "router_logits", {at::kFloat});
  RK_CHECK_ARG(router_logits.dim() == 2, "router_logits", "expected [T, E], got ", router_logits.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& router_logits,
                                                              const at::Tensor& expert_bias, int64_t n_group,
                                                              int64_t topk_group, int64_t top_k,
                                                              double routed_scaling_factor, bool renormalize,
                                                              const std::optional<at::Tensor>& expert_ids) {
  check_router_logits(router_logits);
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  check_same_device(expert_bias, router_logits, "expert_bias");
  check_contiguous(expert_bias, "expert_bias");
  check_dtype(expert_bias, "expert_bias", {at::kFloat});
  RK_CHECK_ARG(expert_bias.dim() == 1 && expert_bias.size(0) == E, "expert_bias", "expected [", E, "], got ",
               expert_bias.sizes());
  check_route_config(E, n_group, topk_group, top_k, "router_logits");
  const int32_t* replay32 = nullptr;
  const int64_t* replay64 = nullptr;
  if (expert_ids.has_value()) {
    const auto& ids = *expert_ids;
    check_same_device(ids, router_logits, "expert_ids");
    check_contiguous(ids, "expert_ids");
    check_dtype(ids, "expert_ids", {at::kInt, at::kLong});
    RK_CHECK_ARG(ids.dim() == 2 && ids.size(0) == T && ids.size(1) == top_k, "expert_ids", "expected [", T, ", ",
                 top_k, "], got ", ids.sizes());
    if (ids.scalar_type() == at::kInt) replay32 = ids.data_ptr<int32_t>();
    else replay64 = ids.data_ptr<int64_t>();
  }
  const c10::cuda::CUDAGuard guard(router_logits.device());
  auto weights = at::empty({T, top_k}, router_logits.options());
  auto ids_out = at::empty({T, top_k}, router_logits.options().dtype(at::kInt));
  const RouteArgs args = route_args(expert_bias, replay32, replay64, weights, ids_out, E, n_group, topk_group, top_k,
                                    routed_scaling_factor, renormalize);
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool block_route = use_block_route(T, E, n_group, topk_group, top_k, expert_ids.has_value());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks =
      block_route ? T : std::min<int64_t>((T + kRouteWarps - 1) / kRouteWarps, 8 * sms);
  // One block stores every count itself; several add theirs into zeros.
  auto counts = blocks == 1 ? at::empty({E}, router_logits.options().dtype(at::kInt))
                            : at::zeros({E}, router_logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids_out, counts};
  if (block_route) {
    const size_t smem = sizeof(int) * (E + 4 * n_group + top_k + 1 + topk_group * std::min(E / n_group, top_k));
    const int threads = static_cast<int>((E + 31) / 32 * 32);
    moe_route_block_kernel<<<static_cast<unsigned>(T), threads, smem, stream>>>(router_logits.data_ptr<float>(), args,
                                                                                counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {weights, ids_out, counts};
  }
  const size_t smem = sizeof(int) * (E + kRouteWarps * n_group);
  with_lanes(E, [&](auto per_lane) {
    moe_route_kernel<per_lane.value><<<blocks, kRouteWarps * 32, smem, stream>>>(
        router_logits.data_ptr<float>(), args, counts.data_ptr<int32_t>(), static_cast<int>(T));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids_out, counts};
}

at::Tensor moe_route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& router_logits,
                                   const at::Tensor& expert_ids, double routed_scaling_factor, bool renormalize) {
  check_router_logits(router_logits);
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  check_same_device(expert_ids, router_logits, "expert_ids");
  check_contiguous(expert_ids, "expert_ids");
  check_dtype(expert_ids, "expert_ids", {at::kInt, at::kLong});
  RK_CHECK_ARG(expert_ids.dim() == 2 && expert_ids.size(0) == T, "expert_ids", "expected [", T, ", k], got ",
               expert_ids.sizes());
  const int64_t k = expert_ids.size(1);
  check_same_device(grad_weights, router_logits, "grad_weights");
  check_contiguous(grad_weights, "grad_weights");
  check_dtype(grad_weights, "grad_weights", {at::kFloat});
  RK_CHECK_ARG(grad_weights.sizes() == expert_ids.sizes(), "grad_weights", "expected ", expert_ids.sizes(), ", got ",
               grad_weights.sizes());
  const c10::cuda::CUDAGuard guard(router_logits.device());
  auto grad_logits = at::zeros_like(router_logits);
  if (T == 0) return grad_logits;
  constexpr int threads = 128;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_id_type(expert_ids, [&](auto ids) {
    moe_route_backward_kernel<<<(T + threads - 1) / threads, threads, 0, stream>>>(
        grad_weights.data_ptr<float>(), router_logits.data_ptr<float>(), ids, grad_logits.data_ptr<float>(),
        static_cast<int>(T), static_cast<int>(E), static_cast<int>(k), static_cast<float>(routed_scaling_factor),
        renormalize);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_logits;
}

Dispatch dispatch_slots(const at::Tensor& expert_ids, int64_t num_experts) {
  check_cuda(expert_ids, "expert_ids");
  check_contiguous(expert_ids, "expert_ids");
  check_dtype(expert_ids, "expert_ids", {at::kInt, at::kLong});
  RK_CHECK_ARG(expert_ids.dim() == 2, "expert_ids", "expected [T, k], got ", expert_ids.sizes());
  RK_CHECK_ARG(num_experts >= 1 && num_experts <= kOffsetThreads, "num_experts", "expected 1..", kOffsetThreads,
               ", got ", num_experts);
  const int64_t S = expert_ids.numel();
  RK_CHECK_ARG(S < INT_MAX, "expert_ids", "expected fewer than 2^31 slots, got ", S);
  const int E = static_cast<int>(num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  auto opts = expert_ids.options().dtype(at::kInt);
  auto sorted_slot = at::empty({S}, opts);
  auto slot_pos = at::empty({S}, opts);
  if (S == 0) return {at::zeros({E}, opts), at::zeros({E}, opts), sorted_slot, slot_pos, at::zeros({E + 1}, opts)};
  auto counts = at::empty({E}, opts);  // the kernels write every entry of these
  auto offsets = at::empty({E}, opts);
  auto active = at::empty({E + 1}, opts);
  // Chunks of at least 512 slots, and few enough for one scan block per expert.
  const int64_t max_chunks = kScanThreads * kScanItems;
  int64_t chunk = std::max<int64_t>(512, (S + max_chunks - 1) / max_chunks);
  chunk = (chunk + 31) / 32 * 32;
  const int chunks = static_cast<int>((S + chunk - 1) / chunk);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (chunks == 1) {
    dispatch_id_type(expert_ids, [&](auto ids) {
      launch_dependent(dispatch_one_block_kernel<std::remove_const_t<std::remove_pointer_t<decltype(ids)>>>, dim3(1),
                       dim3(kOffsetThreads), 0, stream, ids, counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                       active.data_ptr<int32_t>(), sorted_slot.data_ptr<int32_t>(), slot_pos.data_ptr<int32_t>(),
                       static_cast<int>(S), E);
    });
    return {counts, offsets, sorted_slot, slot_pos, active};
  }
  auto chunk_base = at::empty({static_cast<int64_t>(E) * chunks}, opts);
  const int blocks = (chunks + kDispatchWarps - 1) / kDispatchWarps;
  const size_t smem = sizeof(int) * kDispatchWarps * E;
  dispatch_id_type(expert_ids, [&](auto ids) {
    dispatch_histogram_kernel<<<blocks, kDispatchWarps * 32, smem, stream>>>(ids, chunk_base.data_ptr<int32_t>(), S,
                                                                             E, static_cast<int>(chunk), chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_chunk_scan_kernel<<<E, kScanThreads, 0, stream>>>(chunk_base.data_ptr<int32_t>(),
                                                               counts.data_ptr<int32_t>(), chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_offsets_kernel<<<1, kOffsetThreads, 0, stream>>>(counts.data_ptr<int32_t>(),
                                                              offsets.data_ptr<int32_t>(), active.data_ptr<int32_t>(), E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_scatter_kernel<<<blocks, kDispatchWarps * 32, smem, stream>>>(
        ids, chunk_base.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
        sorted_slot.data_ptr<int32_t>(), slot_pos.data_ptr<int32_t>(), S, E, static_cast<int>(chunk), chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {counts, offsets, sorted_slot, slot_pos, active};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cuda(const at::Tensor& expert_ids,
                                                                            int64_t num_experts) {
  Dispatch d = dispatch_slots(expert_ids, num_experts);
  return {d.counts, d.offsets, d.sorted_slot, d.slot_pos};
}

// logits [N, E] fp32 = x [N, H] @ weight [E, H]^T with fp32 accumulation, one cuBLAS GEMM writing fp32: bf16 x
// and weight are read as they are (the same values as the fp32 GEMM of their upcasts, up to the summation
// order); other dtypes are upcast first. No call goes back through the dispatcher, so autocast cannot make
// the logits bf16.
at::Tensor router_logits_cuda(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  check_same_device(weight, x, "weight");
  RK_CHECK_ARG(x.dim() == 2, "x", "expected [N, H], got ", x.sizes());
  RK_CHECK_ARG(weight.dim() == 2 && weight.size(1) == x.size(1), "weight", "expected [E, ", x.size(1), "], got ",
               weight.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), H = x.size(1), E = weight.size(0);
  auto logits = at::empty({N, E}, x.options().dtype(at::kFloat));
  if (N == 0 || E == 0) return logits;
  if (H == 0) return logits.zero_();
  // column-major: logits^T [E, N] = weight [H, E]^T @ x^T [H, N]
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16) {
    const auto xc = x.contiguous(), wc = weight.contiguous();
    gemm<c10::BFloat16, float>('t', 'n', E, N, H, wc.data_ptr<c10::BFloat16>(), H, xc.data_ptr<c10::BFloat16>(), H,
                               0.f, logits.data_ptr<float>(), E);
  } else {
    const auto xf = x.to(at::kFloat).contiguous(), wf = weight.to(at::kFloat).contiguous();
    gemm<float, float>('t', 'n', E, N, H, wf.data_ptr<float>(), H, xf.data_ptr<float>(), H, 0.f,
                       logits.data_ptr<float>(), E);
  }
  return logits;
}

TORCH_LIBRARY_IMPL(ringkern, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("router_logits", &router_logits_cuda);
  m.impl("moe_route_backward", &moe_route_backward_cuda);
  m.impl("moe_dispatch", &moe_dispatch_cuda);
}

}  // namespace ringkern
