// Per-token log-prob, entropy and log-sum-exp of softmax(hidden @ weight^T * inv_temp) on Hopper, without
// [T, V] logits in memory: a CUTLASS 3 warp-specialized GEMM (TMA loads, wgmma, fp32 accumulators) whose
// epilogue reduces every output tile in registers to per-row softmax statistics, and a small merge kernel.
//
//  * GEMM: C = hidden_chunk [M = rows, K = H] @ weight^T (weight [N = V, K] K-major), no C or D tensor.
//  * Epilogue (our own collective; no shared memory): for each row r of the tile and its columns
//    [n0, n0 + tileN) that lie below V, the online statistics of z = acc * inv_temp (as in chunked_softmax.cu):
//    m = max z (-1e30 when the set is empty), s = sum exp(z - m), t = sum exp(z - m) (z - m). Each thread
//    reduces its own columns of a row, then the 4 lanes of the quad that share the row merge theirs with 2
//    xor-shuffles (fixed order). A warp's fragment spans the tile's whole N range (checked below), so there is
//    no cross-warp step. One lane per (row, tile) writes partials[row, n_tile] = (m, s, t). The thread that
//    holds column targets[row] (when it is in the tile) writes z there into logp[row].
//  * Merge kernel: one warp per token merges its n_tiles partials (lane l: tiles l, l + 32, ... in order,
//    then a fixed xor butterfly), and writes lse = m + log s, entropy = log s - t / s and
//    logp = z_target - lse.
//
//  * Optionally (the gradient passes of chunked_softmax.cu) the epilogue also stores the tile's logits, acc
//    rounded to bf16 and not yet scaled by inv_temp, into a caller's [M, ld] buffer: the statistics above
//    still come from the fp32 accumulators, and the bf16 copy only feeds d/d(logits), where the bf16 eager
//    reference has the same rounding. Each thread stores its adjacent column pairs as bf16x2.
//
// Tokens are processed in chunks (default 2048 rows per GEMM, like the cuBLAS path: the chunk of hidden stays
// in L2 while the weight streams once per chunk) so the partials stay small (rows x ceil(V / tileN) x 12 B:
// 30 MB at 2048 rows, V = 157184, tileN = 128). All scratch comes from the caching allocator; nothing syncs
// with the host.
#include "sm90_logits_stats.h"

#if defined(RINGKERN_WITH_CUTLASS)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../common/cutlass_sm90.h"
#endif

namespace ringkern::logprob {

#if defined(RINGKERN_WITH_CUTLASS)
namespace {

using namespace cute;
using Bf16 = cutlass::bfloat16_t;

constexpr float kEmptyMax = -1e30f;  // m of an empty set (as in chunked_softmax.cu)

// Online softmax statistics of a set of scaled logits z: m = max (kEmptyMax when empty), s = sum exp(z - m),
// t = sum exp(z - m) * (z - m); lse = m + log s, entropy = log s - t / s.
struct Stats {
  float m = kEmptyMax;
  float s = 0.f;
  float t = 0.f;
};

// exp(x) as __expf computes it, with denormal results flushed to zero (no range fix-up around MUFU.EX2: the
// logits' exponents are all <= 0, and terms below 2^-126 do not matter next to the row maximum's 1).
CUTLASS_HOST_DEVICE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896340736f));
  return y;
#else
  return std::exp(x);
#endif
}

// The merge of chunked_softmax.cu. Rescaling with the sentinel is safe: exp(-1e30 - x) = 0 and the
// (m_a - m) * s_a term is 0 * finite; merging the empty set into x returns x exactly.
CUTLASS_HOST_DEVICE Stats merge(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m, db = b.m - m;
  const float ea = fast_exp(da), eb = fast_exp(db);
  return {m, a.s * ea + b.s * eb, ea * fmaf(da, a.s, a.t) + eb * fmaf(db, b.s, b.t)};
}

// Epilogue arguments (= params). Row indices are relative to the GEMM's first row (the chunk's first token).
struct StatsArgs {
  float* partials = nullptr;         // [M, n_tiles, 3]: (m, s, t) of row r over N tile j at (r * n_tiles + j) * 3
  float* target_z = nullptr;         // [M]: z[r, targets[r]] (the caller's logp rows; the merge subtracts lse)
  const int64_t* targets = nullptr;  // [M], values in [0, N)
  int64_t n_tiles = 0;               // ceil(N / tileN)
  float inv_temp = 1.f;
  Bf16* logits = nullptr;            // optional [M, ld] bf16 copy of acc (ld even, rows 4-byte aligned)
  int64_t ld = 0;
};

// Layout facts about the wgmma accumulator fragment that the epilogue relies on, checked at compile time.
// Per MMA atom, a thread's fragment is ((2, 2, G)) : ((1 col, 8 rows, 8 cols)) around its origin (row
// lane / 4 + 16 * warp, col 2 * (lane % 4)): values (j, half, g) sit at row r0 + 8 half, col c0 + j + 8 g. The 4
// lanes of a quad hold the same rows (checked by the CPU emulation of the tile math; it is the wgmma C
// layout). With one atom along N (MMA_N == 1) spanning the tile (8 G == tileN), the quad's 4 lanes together
// hold every column of their rows: no warp shares a row with another warp.
template <class TileShapeMNK, class CoordTensor>
struct FragmentFacts {
  using FragLayout = decltype(layout<0>(typename CoordTensor::layout_type{}));
  static_assert(rank(FragLayout{}) == 3, "unexpected accumulator fragment");
  static_assert(size<0>(FragLayout{}) == 2 && size<1>(FragLayout{}) == 2, "unexpected accumulator fragment");
  static_assert(is_same_v<decltype(stride<0>(FragLayout{})), decltype(E<1>{})>, "pair must be adjacent columns");
  static_assert(is_same_v<decltype(stride<1>(FragLayout{})), decltype(Int<8>{} * E<0>{})>, "rows r, r + 8");
  static_assert(is_same_v<decltype(stride<2>(FragLayout{})), decltype(Int<8>{} * E<1>{})>, "8-column groups");
  static constexpr int kGroups = size<2>(FragLayout{});
  static constexpr int kMmaM = size<1>(typename CoordTensor::layout_type{});
  static_assert(size<2>(typename CoordTensor::layout_type{}) == 1, "one MMA atom along N");
  static_assert(8 * kGroups == int(size<1>(TileShapeMNK{})), "a warp's fragment must span the tile's N");
  static constexpr int kSlots = 2 * kMmaM;  // rows per thread: (half, mm) -> slot 2 mm + half
};

// Collective epilogue for the sm90 TMA warp-specialized kernels (cooperative and ping-pong): the interface
// those kernels call, with store() from the math warp groups; no producer load, no TMA store.
class StatsEpilogue {
 public:
  using DispatchPolicy = cutlass::epilogue::NoSmemWarpSpecialized;
  using ElementC = float;
  using ElementD = float;
  using StrideC = Stride<int64_t, Int<1>, int64_t>;
  using StrideD = StrideC;
  using ThreadEpilogueOp = void;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;

  using LoadPipeline = cutlass::PipelineTransactionAsync<0>;
  using LoadPipelineState = cutlass::PipelineState<0>;
  static constexpr bool RequiresTransactionBytes = false;
  using StorePipeline = cutlass::PipelineTmaStore<0>;
  using StorePipelineState = cutlass::PipelineState<0>;

  struct SharedStorage {};
  using TensorStorage = SharedStorage;
  using TensorMapStorage = SharedStorage;
  using PipelineStorage = typename LoadPipeline::SharedStorage;

  using Arguments = StatsArgs;
  using Params = StatsArgs;

  template <class PS>
  static Params to_underlying_arguments(PS const&, Arguments const& args, void*) {
    return args;
  }
  template <class PS>
  static size_t get_workspace_size(PS const&, Arguments const&) {
    return 0;
  }
  template <class PS>
  static cutlass::Status initialize_workspace(PS const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class PS>
  static bool can_implement(PS const&, Arguments const& args) {
    return args.partials != nullptr && args.target_z != nullptr && args.targets != nullptr && args.n_tiles > 0;
  }
  template <class TileShape>
  CUTLASS_HOST_DEVICE static constexpr int get_load_pipe_increment(TileShape) {
    return 1;
  }
  template <class TileShape>
  CUTLASS_HOST_DEVICE static constexpr int get_store_pipe_increment(TileShape) {
    return 1;
  }
  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const&) {}

  CUTLASS_HOST_DEVICE StatsEpilogue(Params const& params, TensorStorage&) : params_(params) {}

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  template <class... Ts>
  CUTLASS_DEVICE LoadPipelineState load(LoadPipeline, LoadPipelineState state, Ts&&...) {
    return state;
  }
  CUTLASS_DEVICE LoadPipelineState load_tail(LoadPipeline, LoadPipelineState state) { return state; }
  CUTLASS_DEVICE auto store_tail(LoadPipeline, LoadPipelineState load_state, StorePipeline,
                                 StorePipelineState store_state) {
    return cute::make_tuple(load_state, store_state);
  }

  // One output tile (tile_coord = (m, n, _, l)) from the accumulators of this thread.
  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class AccEngine, class AccLayout,
            class TiledMma>
  CUTLASS_DEVICE auto store(LoadPipeline, LoadPipelineState load_state, StorePipeline, StorePipelineState store_state,
                            ProblemShapeMNKL problem_shape_mnkl, TileShapeMNK tile_shape_mnk,
                            TileCoordMNKL tile_coord_mnkl, Tensor<AccEngine, AccLayout> const& acc,
                            TiledMma tiled_mma, int thread_idx, TensorStorage&, int = -1) {
    if (params_.logits != nullptr) {
      write_logits(params_, problem_shape_mnkl, tile_shape_mnk, tile_coord_mnkl, acc, tiled_mma, thread_idx);
    }
    constexpr int kSlots = 2 * int(size<1>(AccLayout{}));
    Stats st[kSlots];
    thread_tile_stats(params_, problem_shape_mnkl, tile_shape_mnk, tile_coord_mnkl, acc, tiled_mma, thread_idx, st);
    // The 4 lanes of the quad hold the same rows: after the butterfly each has the row's tile statistics.
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      CUTLASS_PRAGMA_UNROLL
      for (int offset = 1; offset <= 2; offset <<= 1) {
        const Stats other{__shfl_xor_sync(0xffffffffu, st[j].m, offset), __shfl_xor_sync(0xffffffffu, st[j].s, offset),
                          __shfl_xor_sync(0xffffffffu, st[j].t, offset)};
        st[j] = merge(st[j], other);
      }
    }
    write_partials(params_, problem_shape_mnkl, tile_shape_mnk, tile_coord_mnkl, tiled_mma, thread_idx, st);
    return cute::make_tuple(load_state, store_state);
  }

  // Per-thread part of the tile (host-callable for the CPU emulation): the statistics of this thread's columns
  // of each of its rows, and z at the target column of the rows whose target it holds.
  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class AccEngine, class AccLayout,
            class TiledMma, int kSlots>
  CUTLASS_HOST_DEVICE static void thread_tile_stats(Params const& params, ProblemShapeMNKL problem_shape_mnkl,
                                                    TileShapeMNK tile_shape_mnk, TileCoordMNKL tile_coord_mnkl,
                                                    Tensor<AccEngine, AccLayout> const& acc, TiledMma tiled_mma,
                                                    int thread_idx, Stats (&st)[kSlots]) {
    static_assert(is_static<TileShapeMNK>::value && is_static<AccLayout>::value);
    // (m, n) coordinates within the tile of each accumulator of this thread: (VAL, MMA_M, MMA_N).
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(tile_shape_mnk)));
    static_assert(is_same_v<decltype(shape(tCcD)), decltype(shape(acc))>, "fragment/coordinate shape mismatch");
    using Facts = FragmentFacts<TileShapeMNK, decltype(tCcD)>;
    static_assert(Facts::kSlots == kSlots);
    constexpr int kGroups = Facts::kGroups;
    constexpr int kTileM = size<0>(TileShapeMNK{});
    constexpr int kTileN = size<1>(TileShapeMNK{});

    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);
    const int m0 = int(get<0>(tile_coord_mnkl)) * kTileM;
    const int n0 = int(get<1>(tile_coord_mnkl)) * kTileN;
    const float inv_temp = params.inv_temp;
    const bool full = n0 + kTileN <= N;  // every column of the tile is a valid vocabulary entry

    // Row and first column (within the tile) of each slot; the targets of valid rows (-1: none).
    int row[kSlots], col0[kSlots];
    int64_t target[kSlots];
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < Facts::kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int slot = 2 * mm + half;
        row[slot] = m0 + int(get<0>(tCcD(make_coord(0, half, 0), mm, 0)));
        col0[slot] = int(get<1>(tCcD(make_coord(0, half, 0), mm, 0)));
        target[slot] = row[slot] < M ? params.targets[row[slot]] : int64_t{-1};
      }
    }

    // Statistics of this thread's valid columns of slot (mm, half); kMasked: only columns n0 + c < N.
    auto slot_stats = [&](auto masked, int mm, int half) {
      constexpr bool kMasked = decltype(masked)::value;
      const int limit = N - n0 - col0[2 * mm + half];  // value (j, g) is valid iff j + 8 g < limit
      float amax0 = -INFINITY, amax1 = -INFINITY;
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kGroups; ++g) {
        const float a0 = acc(make_coord(0, half, g), mm, 0), a1 = acc(make_coord(1, half, g), mm, 0);
        if (!kMasked || 8 * g < limit) amax0 = fmaxf(amax0, a0);
        if (!kMasked || 8 * g + 1 < limit) amax1 = fmaxf(amax1, a1);
      }
      const float amax = fmaxf(amax0, amax1);
      Stats out;  // empty
      if (kMasked && amax == -INFINITY) return out;
      // inv_temp > 0 (checked on the host): max z = amax * inv_temp, rounded alike.
      const float m = amax * inv_temp;
      float s0 = 0.f, s1 = 0.f, t0 = 0.f, t1 = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kGroups; ++g) {
        const float d0 = fmaf(acc(make_coord(0, half, g), mm, 0), inv_temp, -m);
        const float d1 = fmaf(acc(make_coord(1, half, g), mm, 0), inv_temp, -m);
        float e0 = fast_exp(d0), e1 = fast_exp(d1);
        if (kMasked) {
          e0 = 8 * g < limit ? e0 : 0.f;
          e1 = 8 * g + 1 < limit ? e1 : 0.f;
        }
        s0 += e0;
        s1 += e1;
        t0 = fmaf(e0, d0, t0);
        t1 = fmaf(e1, d1, t1);
      }
      out.m = m;
      out.s = s0 + s1;
      out.t = t0 + t1;
      return out;
    };

    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < Facts::kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int slot = 2 * mm + half;
        st[slot] = full ? slot_stats(cute::false_type{}, mm, half) : slot_stats(cute::true_type{}, mm, half);
        // z at the target column, when this thread holds it: column n0 + col0 + j + 8 g.
        const int64_t local = target[slot] - n0 - col0[slot];
        if (local >= 0 && local < 8 * kGroups && (local & 7) < 2) {
          float z = 0.f;
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kGroups; ++g) {
            if (local == 8 * g) z = acc(make_coord(0, half, g), mm, 0);
            if (local == 8 * g + 1) z = acc(make_coord(1, half, g), mm, 0);
          }
          params.target_z[row[slot]] = z * inv_temp;
        }
      }
    }
  }

  // The bf16 copy of this thread's accumulators: values (0, half, g) and (1, half, g) are the adjacent
  // columns n0 + col0 + 8 g and + 1 of their row (FragmentFacts), one 4-byte store per pair below N.
  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class AccEngine, class AccLayout,
            class TiledMma>
  CUTLASS_DEVICE static void write_logits(Params const& params, ProblemShapeMNKL problem_shape_mnkl,
                                          TileShapeMNK tile_shape_mnk, TileCoordMNKL tile_coord_mnkl,
                                          Tensor<AccEngine, AccLayout> const& acc, TiledMma tiled_mma,
                                          int thread_idx) {
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(tile_shape_mnk)));
    using Facts = FragmentFacts<TileShapeMNK, decltype(tCcD)>;
    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);
    const int m0 = int(get<0>(tile_coord_mnkl)) * int(size<0>(tile_shape_mnk));
    const int n0 = int(get<1>(tile_coord_mnkl)) * int(size<1>(tile_shape_mnk));
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < Facts::kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int r = m0 + int(get<0>(tCcD(make_coord(0, half, 0), mm, 0)));
        if (r >= M) continue;
        const int c = n0 + int(get<1>(tCcD(make_coord(0, half, 0), mm, 0)));
        Bf16* out = params.logits + int64_t(r) * params.ld;
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < Facts::kGroups; ++g) {
          const int col = c + 8 * g;
          const float a0 = acc(make_coord(0, half, g), mm, 0), a1 = acc(make_coord(1, half, g), mm, 0);
          if (col + 1 < N) {
            *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(a0, a1);
          } else if (col < N) {
            out[col] = Bf16(a0);
          }
        }
      }
    }
  }

  // After the quad merge (every lane of the quad holds the row statistics): lane q writes the slots j with
  // j % 4 == q (one partial per row and tile; rows >= M are not written).
  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class TiledMma, int kSlots>
  CUTLASS_HOST_DEVICE static void write_partials(Params const& params, ProblemShapeMNKL problem_shape_mnkl,
                                                 TileShapeMNK tile_shape_mnk, TileCoordMNKL tile_coord_mnkl,
                                                 TiledMma tiled_mma, int thread_idx, Stats const (&st)[kSlots]) {
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(tile_shape_mnk)));
    using Facts = FragmentFacts<TileShapeMNK, decltype(tCcD)>;
    static_assert(Facts::kSlots == kSlots);
    const int M = get<0>(problem_shape_mnkl);
    const int m0 = int(get<0>(tile_coord_mnkl)) * int(size<0>(tile_shape_mnk));
    const int64_t n_tile = int64_t(get<1>(tile_coord_mnkl));
    const int q = thread_idx & 3;
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < Facts::kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int slot = 2 * mm + half;
        const int r = m0 + int(get<0>(tCcD(make_coord(0, half, 0), mm, 0)));
        if ((slot & 3) == q && r < M) {
          float* p = params.partials + (int64_t(r) * params.n_tiles + n_tile) * 3;
          p[0] = st[slot].m;
          p[1] = st[slot].s;
          p[2] = st[slot].t;
        }
      }
    }
  }

 private:
  Params params_;
};

// A GEMM C [M, N] = A [M, K] (row-major) @ B^T (B [N, K] K-major, CUTLASS ColumnMajor), fp32 accumulators,
// with the statistics epilogue.
template <class Schedule, class Tile, class Cluster>
struct StatsGemm {
  using Epilogue = StatsEpilogue;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, cutlass::layout::RowMajor, 8, Bf16,
      cutlass::layout::ColumnMajor, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using TileShape = Tile;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  static_assert(is_same_v<StrideA, Stride<int64_t, Int<1>, int64_t>> &&
                is_same_v<StrideB, Stride<int64_t, Int<1>, int64_t>>, "K-major A and B expected");
};

// Tile variants, picked at run time by RINGKERN_LOGPROB_STATS_TILE:
//  "pingpong" (default): 128x128x64 tile, one math warp group per tile (2 x 64 rows: MMA_M = 2, 4 rows per
//       thread); its epilogue (one exp per logit) overlaps the other warp group's main loop. Cluster 2x1
//       (the two CTAs share the weight tile through TMA multicast).
//  "cooperative": 128x256x64 tile, both math warp groups on one tile (64 rows each, 2 rows per thread); the
//       epilogue is exposed. Cluster 2x1 (the larger 256-row weight tile is multicast).
using PingpongConfig = StatsGemm<cutlass::gemm::KernelTmaWarpSpecializedPingpong, Shape<_128, _128, _64>,
                                 Shape<_2, _1, _1>>;
using CooperativeConfig = StatsGemm<cutlass::gemm::KernelTmaWarpSpecializedCooperative, Shape<_128, _256, _64>,
                                    Shape<_2, _1, _1>>;


constexpr int kMergeWarps = 8;

// One warp per token: merges the token's n_tiles partials (lane l takes tiles l, l + 32, ... in order, then a
// fixed butterfly), then lse, entropy and logp = z_target - lse (z_target is in logp, from the epilogue).
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_partials_kernel(const float* __restrict__ partials, int64_t n_tiles, int64_t rows, float* logp,
                          float* entropy, float* lse) {
  const int64_t row = int64_t(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const float* p = partials + row * n_tiles * 3;
  Stats st;
  for (int64_t j = lane; j < n_tiles; j += 32) st = merge(st, Stats{p[3 * j], p[3 * j + 1], p[3 * j + 2]});
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stats other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                      __shfl_xor_sync(0xffffffffu, st.t, offset)};
    st = merge(st, other);
  }
  if (lane == 0) {
    const float log_s = logf(st.s), l = st.m + log_s;
    lse[row] = l;
    entropy[row] = log_s - st.t / st.s;
    logp[row] -= l;
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? std::atoll(env) : fallback;
}

bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

constexpr int64_t kDefaultChunkRows = 2048;
constexpr int64_t kMaxChunkRows = 16384;
constexpr int64_t kChunkRowAlign = 128;

// Rows per GEMM: at most RINGKERN_LOGPROB_STATS_CHUNK_ROWS (default 2048, clamped to [1, 16384]), balanced over
// the chunks, a multiple of 128 when that is possible.
int64_t chunk_rows(int64_t tokens) {
  int64_t max_rows = std::clamp<int64_t>(env_int("RINGKERN_LOGPROB_STATS_CHUNK_ROWS", kDefaultChunkRows), 1,
                                         kMaxChunkRows);
  const int64_t align = max_rows >= kChunkRowAlign ? kChunkRowAlign : 1;
  max_rows = max_rows / align * align;
  const int64_t n_chunks = (tokens + max_rows - 1) / max_rows;
  const int64_t rows = (tokens + n_chunks - 1) / n_chunks;
  return std::min(tokens, (rows + align - 1) / align * align);
}

template <class Config>
bool run_stats(const Bf16* hidden, const Bf16* weight, const int64_t* targets, int64_t T, int64_t V, int64_t H,
               float inv_temp, float* logp, float* entropy, float* lse, Bf16* logits, int64_t ld, int device,
               cudaStream_t stream) {
  using Gemm = typename Config::Gemm;
  constexpr int64_t kTileN = size<1>(typename Config::TileShape{});
  const int64_t n_tiles = (V + kTileN - 1) / kTileN;
  const int64_t rows = chunk_rows(T);

  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);

  using RasterOrderOptions = cutlass::gemm::kernel::detail::RasterOrderOptions;
  RasterOrderOptions raster = RasterOrderOptions::AlongM;  // consecutive tiles share their weight tile
  if (env_is("RINGKERN_LOGPROB_STATS_RASTER", "n")) raster = RasterOrderOptions::AlongN;
  if (env_is("RINGKERN_LOGPROB_STATS_RASTER", "auto")) raster = RasterOrderOptions::Heuristic;

  auto make_args = [&](int64_t start, int64_t n, float* partials) {
    StatsArgs epi;
    epi.partials = partials;
    epi.target_z = logp + start;
    epi.targets = targets + start;
    epi.n_tiles = n_tiles;
    epi.inv_temp = inv_temp;
    epi.logits = logits != nullptr ? logits + start * ld : nullptr;
    epi.ld = ld;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {int(n), int(V), int(H), 1},
        {hidden + start * H, typename Config::StrideA{H, Int<1>{}, int64_t{0}}, weight,
         typename Config::StrideB{H, Int<1>{}, int64_t{0}}},
        epi,
        hw};
    args.scheduler.raster_order = raster;
    return args;
  };

  // Validate every chunk's arguments (same shapes but the last) before launching anything.
  float* const fake = reinterpret_cast<float*>(uintptr_t{256});  // non-null placeholder for can_implement
  for (int64_t n : {rows, T - (T - 1) / rows * rows}) {
    if (Gemm::can_implement(make_args(0, n, fake)) != cutlass::Status::kSuccess) return false;
  }
  const size_t workspace_bytes = std::max(Gemm::get_workspace_size(make_args(0, rows, fake)),
                                          Gemm::get_workspace_size(make_args(0, T - (T - 1) / rows * rows, fake)));
  const int64_t partial_floats = rows * n_tiles * 3;
  const int64_t workspace_floats = int64_t((workspace_bytes + sizeof(float) - 1) / sizeof(float));
  const int64_t partial_pad = (partial_floats + 63) / 64 * 64;  // the workspace starts 256-byte aligned
  at::Tensor scratch = at::empty({partial_pad + workspace_floats},
                                 at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device));
  float* partials = scratch.data_ptr<float>();
  void* workspace = workspace_bytes > 0 ? static_cast<void*>(partials + partial_pad) : nullptr;

  for (int64_t start = 0; start < T; start += rows) {
    const int64_t n = std::min(rows, T - start);
    Gemm gemm;
    TORCH_CHECK(gemm.initialize(make_args(start, n, partials), workspace, stream) == cutlass::Status::kSuccess,
                "ringkern: CUTLASS logits-stats GEMM: initialize failed");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "ringkern: CUTLASS logits-stats GEMM: launch failed");
    const int64_t blocks = (n + kMergeWarps - 1) / kMergeWarps;
    merge_partials_kernel<<<static_cast<unsigned>(blocks), kMergeWarps * 32, 0, stream>>>(
        partials, n_tiles, n, logp + start, entropy + start, lse + start);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

bool is_bf16_cuda_contiguous(const at::Tensor& t) {
  return t.defined() && t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.is_contiguous();
}

}  // namespace
#endif

bool stats_gemm_applies(const at::Tensor& hidden, const at::Tensor& weight, float inv_temp) {
#if !defined(RINGKERN_WITH_CUTLASS)
  (void)hidden, (void)weight, (void)inv_temp;
  return false;
#else
  if (!is_bf16_cuda_contiguous(hidden) || !is_bf16_cuda_contiguous(weight)) return false;
  const int64_t H = hidden.size(1), V = weight.size(0);
  const int device = hidden.get_device();
  // TMA: 16-byte aligned bases and row strides (H % 8 == 0). The epilogue takes max z = max(acc) * inv_temp,
  // which needs inv_temp > 0.
  if (weight.size(1) != H || weight.get_device() != device || H <= 0 || H % 8 != 0 || V <= 0 ||
      H > INT32_MAX || V > INT32_MAX || !(inv_temp > 0.f) || !std::isfinite(inv_temp) ||
      reinterpret_cast<uintptr_t>(hidden.data_ptr()) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 != 0) {
    return false;
  }
  // The kernels are built for sm_90a only: other GPUs take the caller's fallback.
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  return prop->major == 9 && prop->minor == 0;
#endif
}

bool token_stats_sm90(const at::Tensor& hidden, const at::Tensor& weight, const int64_t* targets, float inv_temp,
                      float* logp, float* entropy, float* lse, cudaStream_t stream, c10::BFloat16* logits,
                      int64_t ld) {
#if !defined(RINGKERN_WITH_CUTLASS)
  (void)hidden, (void)weight, (void)targets, (void)inv_temp, (void)logp, (void)entropy, (void)lse, (void)stream;
  (void)logits, (void)ld;
  return false;
#else
  if (!stats_gemm_applies(hidden, weight, inv_temp)) return false;
  if (hidden.size(0) == 0) return true;
  if (targets == nullptr || logp == nullptr || entropy == nullptr || lse == nullptr) return false;
  if (logits != nullptr && (ld < weight.size(0) || ld % 2 != 0 || reinterpret_cast<uintptr_t>(logits) % 4 != 0)) {
    return false;
  }
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const int device = hidden.get_device();
  const c10::cuda::CUDAGuard guard(device);
  const auto* h = reinterpret_cast<const Bf16*>(hidden.data_ptr());
  const auto* w = reinterpret_cast<const Bf16*>(weight.data_ptr());
  auto* out = reinterpret_cast<Bf16*>(logits);
  if (env_is("RINGKERN_LOGPROB_STATS_TILE", "cooperative")) {
    return run_stats<CooperativeConfig>(h, w, targets, T, V, H, inv_temp, logp, entropy, lse, out, ld, device,
                                        stream);
  }
  return run_stats<PingpongConfig>(h, w, targets, T, V, H, inv_temp, logp, entropy, lse, out, ld, device, stream);
#endif
}

}  // namespace ringkern::logprob
