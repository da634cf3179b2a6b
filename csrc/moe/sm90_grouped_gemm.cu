// Routed-expert GEMMs of an MoE layer on Hopper: CUTLASS 3 ptr-array grouped GEMMs (TMA loads, wgmma,
// warp-specialized persistent kernels, one group per expert) with the elementwise tail fused in the epilogue.
//
//  * gate_up: C_e = X_e @ W_gu[e]^T (fp32 accumulators). The epilogue writes C as bf16 (gate_up_out, kept
//    for the backward) and act = silu(gate) * up from the fp32 accumulators. W_gu's gate and up rows are
//    interleaved (row 2i = gate_i, row 2i+1 = up_i), so gate_i and up_i land in columns 2i and 2i+1 of C,
//    which in the wgmma accumulator fragment are consecutive registers of one thread: SwiGLU needs no data
//    exchange (the layout is checked at compile time below).
//  * down: Y_e = A_e @ W_down[e]^T, stored as bf16(row_scale[p] * acc) (the routing weight of the slot).
//
// The epilogue is our own collective (no shared memory; CUTLASS's are elementwise): each quad of lanes
// holding the same rows transposes its fragment with 4 shuffles so that every lane stores 16 contiguous
// bytes (8 for act) instead of 4 (2). Rows past the group's M_e are masked (M tails, and tiles that the
// cluster shape pads).
//
// Everything the grouped kernel needs per expert (problem shape (M_e, N, K), A/B pointers, strides) is
// filled on the device by a small setup kernel from `offsets`; CUTLASS gets no host problem shapes, so its
// persistent grid is one CTA per SM and empty groups simply have no tiles. Nothing syncs with the host, and
// the scratch (setup arrays + CUTLASS workspace) comes from the caching allocator, so the calls can be
// captured in a CUDA graph.
#include "sm90_grouped_gemm.h"

#if defined(RINGKERN_WITH_CUTLASS)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include <cstdlib>
#include <cstring>

#include "../common/cutlass_sm90.h"
#endif

namespace ringkern::moe {

#if defined(RINGKERN_WITH_CUTLASS)
namespace {

using namespace cute;
using Bf16 = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M_e, N, K) per expert
// Per-group stride of A [M, K] (RowMajor*) and of B [N, K] (ColumnMajor*): both K-major, (ld, 1, 0).
using StrideKMajor = Stride<int64_t, Int<1>, Int<0>>;

// Epilogue arguments (= params): base pointers of the whole sorted outputs; the group's first row is
// offsets[group - 1].
struct EpilogueArgs {
  Bf16* out = nullptr;                // [S, N]: gate_up_out or y_sorted
  Bf16* act = nullptr;                // [S, N / 2] (SwiGLU only)
  const float* row_scale = nullptr;   // [S] or nullptr (down only)
  const int32_t* offsets = nullptr;   // [E] cumulative ends
  float* combine_out = nullptr;       // [T, N] fp32: rows added at their tokens instead of stored (down only)
  const int32_t* sorted_slot = nullptr;  // [S] slot (token * k + j) of each sorted row, with combine_out
  int k = 1;
  int64_t ld_out = 0;
  int64_t ld_act = 0;
};

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// In-register 4x4 transpose across the 4 lanes of a quad: on return, word j of lane q is what word q of
// lane (quad base + j) held. Two butterfly stages (lane bit 0 <-> word bit 0, then bit 1), 4 shuffles.
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int q) {
  const bool b0 = q & 1;
  uint32_t s0 = __shfl_xor_sync(0xffffffffu, b0 ? w[0] : w[1], 1);
  uint32_t s1 = __shfl_xor_sync(0xffffffffu, b0 ? w[2] : w[3], 1);
  if (b0) {
    w[0] = s0;
    w[2] = s1;
  } else {
    w[1] = s0;
    w[3] = s1;
  }
  const bool b1 = q & 2;
  s0 = __shfl_xor_sync(0xffffffffu, b1 ? w[0] : w[2], 2);
  s1 = __shfl_xor_sync(0xffffffffu, b1 ? w[1] : w[3], 2);
  if (b1) {
    w[0] = s0;
    w[1] = s1;
  } else {
    w[2] = s0;
    w[3] = s1;
  }
}

__device__ __forceinline__ float swiglu(float g, float u) { return g / (1.f + __expf(-g)) * u; }

// Collective epilogue for the sm90 ptr-array (grouped) kernels, cooperative and ping-pong: the interface
// those kernels call (store() from the math warp groups; no producer load, no TMA store, no tensormaps).
template <bool kSwiGLU>
class MoeEpilogue {
 public:
  using DispatchPolicy = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using ElementC = Bf16;
  using ElementD = Bf16;
  using StrideC = Stride<int64_t, Int<1>, Int<0>>;
  using StrideD = StrideC;
  using InternalStrideC = StrideC;
  using InternalStrideD = StrideD;
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

  using Arguments = EpilogueArgs;
  using Params = EpilogueArgs;

  template <class PS>
  static Params to_underlying_arguments(PS const&, Arguments const& args, void*) {
    return args;
  }
  template <class PS>
  static size_t get_workspace_size(PS const&, Arguments const&, int) {
    return 0;
  }
  template <class PS>
  static cutlass::Status initialize_workspace(PS const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class PS>
  static bool can_implement(PS const&, Arguments const& args) {
    // 16-byte stores of 8 output columns, 8-byte stores of 4 act columns.
    const auto aligned = [](const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    if (args.combine_out) return !kSwiGLU && args.offsets && args.sorted_slot && args.ld_out % 2 == 0;
    return args.out && args.offsets && aligned(args.out, 16) && args.ld_out % 8 == 0 &&
           (!kSwiGLU || (args.act && aligned(args.act, 8) && args.ld_act % 4 == 0));
  }
  template <class TileShape>
  CUTLASS_HOST_DEVICE static constexpr int get_load_pipe_increment(TileShape) {
    return 1;
  }
  template <class TileShape>
  CUTLASS_HOST_DEVICE static constexpr int get_store_pipe_increment(TileShape) {
    return 1;
  }

  CUTLASS_HOST_DEVICE MoeEpilogue(Params const& params, TensorStorage&) : params_(params) {}

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE auto load_init(Params const&, TensorMapStorage&, int32_t, int32_t) {
    return cute::make_tuple(nullptr);
  }
  template <class... Ts>
  CUTLASS_DEVICE LoadPipelineState load(LoadPipeline, LoadPipelineState state, Ts&&...) {
    return state;
  }
  CUTLASS_DEVICE LoadPipelineState load_tail(LoadPipeline, LoadPipelineState state) { return state; }
  CUTLASS_DEVICE auto store_init(Params const&, TensorMapStorage&, int32_t, int32_t, int32_t) {
    return cute::make_tuple(nullptr);
  }
  CUTLASS_DEVICE auto store_tail(LoadPipeline, LoadPipelineState load_state, StorePipeline,
                                 StorePipelineState store_state) {
    return cute::make_tuple(load_state, store_state);
  }
  template <bool IsLoad, class... Ts>
  CUTLASS_DEVICE void tensormaps_perform_update(Ts&&...) {}
  template <bool IsLoad, class... Ts>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(Ts&&...) {}
  template <bool IsLoad, class... Ts>
  CUTLASS_DEVICE void tensormaps_fence_acquire(Ts&&...) {}

  // One output tile (tile_coord = (m, n, _, group)) from the accumulators of this thread.
  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class AccEngine, class AccLayout,
            class TiledMma, class TensorMap>
  CUTLASS_DEVICE auto store(LoadPipeline, LoadPipelineState load_state, StorePipeline, StorePipelineState store_state,
                            ProblemShapeMNKL problem_shape_mnkl, TileShapeMNK tile_shape_mnk,
                            TileCoordMNKL tile_coord_mnkl, Tensor<AccEngine, AccLayout> const& acc,
                            TiledMma tiled_mma, int thread_idx, TensorStorage&, TensorMap const&, int = -1) {
    static_assert(is_static<TileShapeMNK>::value && is_static<AccLayout>::value);
    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);
    const int group = get<3>(tile_coord_mnkl);
    const int m0 = get<0>(tile_coord_mnkl) * int(size<0>(tile_shape_mnk));  // tile origin within the group
    const int n0 = get<1>(tile_coord_mnkl) * int(size<1>(tile_shape_mnk));
    const int64_t row_base = group > 0 ? int64_t(params_.offsets[group - 1]) : 0;  // group's first row in S

    // (m, n) coordinates within the tile of each accumulator of this thread: (VAL, MMA_M, MMA_N).
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(tile_shape_mnk)));
    static_assert(is_same_v<decltype(shape(tCcD)), decltype(shape(acc))>, "fragment/coordinate shape mismatch");
    // The wgmma C fragment of a thread, per MMA atom, is ((2, 2, G)) : ((1 col, 8 rows, 8 cols)) around the
    // thread's origin (row lane/4 (+16 per warp), col 2 * (lane % 4)): value pairs (2j, 2j+1) are columns
    // (n, n + 1) of one row, n even; lanes of a quad hold the same rows. The store below depends on it.
    using FragLayout = decltype(layout<0>(tCcD.layout()));
    static_assert(rank(FragLayout{}) == 3, "unexpected accumulator fragment");
    static_assert(size<0>(FragLayout{}) == 2 && size<1>(FragLayout{}) == 2 && size<2>(FragLayout{}) % 4 == 0,
                  "unexpected accumulator fragment");
    static_assert(is_same_v<decltype(stride<0>(FragLayout{})), decltype(E<1>{})>, "pair must be adjacent columns");
    static_assert(is_same_v<decltype(stride<1>(FragLayout{})), decltype(Int<8>{} * E<0>{})>, "rows r, r + 8");
    static_assert(is_same_v<decltype(stride<2>(FragLayout{})), decltype(Int<8>{} * E<1>{})>, "8-column groups");
    constexpr int kGroups = size<2>(FragLayout{});

    const int q = thread_idx & 3;  // lane within the quad: the thread's columns are 2q, 2q + 1 (mod 8)
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < size<1>(tCcD); ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < size<2>(tCcD); ++nn) {
        // Rows r (half 0) and r + 8 (half 1) of this thread in this atom.
        bool row_ok[2];
        int64_t row[2];
        float scale[2];
        CUTLASS_PRAGMA_UNROLL
        for (int half = 0; half < 2; ++half) {
          const int m = m0 + int(get<0>(tCcD(make_coord(0, half, 0), mm, nn)));
          row_ok[half] = m < M;
          row[half] = row_base + m;
          scale[half] = 1.f;
          if constexpr (!kSwiGLU) {
            if (params_.row_scale != nullptr && row_ok[half]) scale[half] = params_.row_scale[row[half]];
          }
        }
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < kGroups / 4; ++h) {
          // This lane stores columns [col, col + 8) of the tile: 8-column group 4h + q of the quad's 4.
          const int col = n0 + int(get<1>(tCcD(make_coord(0, 0, 4 * h), mm, nn))) - 2 * q + 8 * q;
          const bool col_ok = col + 8 <= N;  // N % 8 == 0 (checked on the host)
          if constexpr (!kSwiGLU) {
            if (params_.combine_out != nullptr) {  // opt-in fused combine: fp32 atomics at the token's row
              CUTLASS_PRAGMA_UNROLL
              for (int half = 0; half < 2; ++half) {
                if (!row_ok[half]) continue;
                float* dst = params_.combine_out + int64_t(params_.sorted_slot[row[half]] / params_.k) * params_.ld_out;
                CUTLASS_PRAGMA_UNROLL
                for (int j = 0; j < 4; ++j) {
                  const int n = n0 + int(get<1>(tCcD(make_coord(0, half, 4 * h + j), mm, nn)));  // even
                  if (n < N) {
                    atomicAdd(reinterpret_cast<float2*>(dst + n),
                              make_float2(scale[half] * acc(make_coord(0, half, 4 * h + j), mm, nn),
                                          scale[half] * acc(make_coord(1, half, 4 * h + j), mm, nn)));
                  }
                }
              }
              continue;
            }
          }
          float act_f[2][4];                 // act of group 4h + j for rows r, r + 8
          CUTLASS_PRAGMA_UNROLL
          for (int half = 0; half < 2; ++half) {
            uint32_t w[4];
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < 4; ++j) {
              const float c0 = acc(make_coord(0, half, 4 * h + j), mm, nn);
              const float c1 = acc(make_coord(1, half, 4 * h + j), mm, nn);
              w[j] = pack_bf16x2(scale[half] * c0, scale[half] * c1);
              if constexpr (kSwiGLU) act_f[half][j] = swiglu(c0, c1);
            }
            quad_transpose(w, q);  // word j: columns col + 2j, col + 2j + 1
            if (row_ok[half] && col_ok) {
              *reinterpret_cast<uint4*>(params_.out + row[half] * params_.ld_out + col) =
                  make_uint4(w[0], w[1], w[2], w[3]);
            }
          }
          if constexpr (kSwiGLU) {
            // Row r in the low half, row r + 8 in the high; after the transpose, word j holds act column
            // col / 2 + j (gate column col + 2j).
            uint32_t act_w[4];
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < 4; ++j) act_w[j] = pack_bf16x2(act_f[0][j], act_f[1][j]);
            quad_transpose(act_w, q);
            const int acol = col / 2;
            if (row_ok[0] && col_ok) {
              *reinterpret_cast<uint2*>(params_.act + row[0] * params_.ld_act + acol) =
                  make_uint2(__byte_perm(act_w[0], act_w[1], 0x5410), __byte_perm(act_w[2], act_w[3], 0x5410));
            }
            if (row_ok[1] && col_ok) {
              *reinterpret_cast<uint2*>(params_.act + row[1] * params_.ld_act + acol) =
                  make_uint2(__byte_perm(act_w[0], act_w[1], 0x7632), __byte_perm(act_w[2], act_w[3], 0x7632));
            }
          }
        }
      }
    }
    return cute::make_tuple(load_state, store_state);
  }

 private:
  Params params_;
};

// One grouped GEMM: A [M_e, K] row-major (rows of the sorted activations), B = W[e] [N, K] K-major.
template <class Schedule, class Tile, class Cluster, bool kSwiGLU>
struct GroupedGemm {
  using Epilogue = MoeEpilogue<kSwiGLU>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, cutlass::layout::RowMajor*, 8, Bf16,
      cutlass::layout::ColumnMajor*, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(is_same_v<typename Kernel::InternalStrideA, StrideKMajor> &&
                is_same_v<typename Kernel::InternalStrideB, StrideKMajor>);
};

// Tile variants, picked at run time by RINGKERN_MOE_CUTLASS_TILE:
//  "pingpong" (default): 128x128x64 tile (one warp group per tile; its epilogue overlaps the other's
//       mainloop), cluster 1x2 (the two CTAs share the A tile through TMA multicast).
//  "cooperative": 128x256x64 tile (both math warp groups on one tile, 64 rows each), cluster 1x2.
// Measured on an H200 at Ring-flash shapes (routed path with router, T=16384): ping-pong 7.00 ms, cooperative
// 8.16 ms, torch._grouped_mm 7.81 ms; the cooperative epilogue (3 bf16 outputs per gate_up row) is exposed.
using Coop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
template <bool kSwiGLU>
using PingpongTile = GroupedGemm<Pingpong, Shape<_128, _128, _64>, Shape<_1, _2, _1>, kSwiGLU>;
template <bool kSwiGLU>
using CooperativeTile = GroupedGemm<Coop, Shape<_128, _256, _64>, Shape<_1, _2, _1>, kSwiGLU>;

bool cooperative_tile() {
  const char* env = std::getenv("RINGKERN_MOE_CUTLASS_TILE");
  return env != nullptr && std::strcmp(env, "cooperative") == 0;
}


// Per expert e: problem shape (M_e, N, K), A = a + start_e * K, B = b + e * N * K, strides (K, 1, 0).
__global__ void setup_groups_kernel(const int32_t* __restrict__ offsets, int E, int N, int K, const Bf16* a,
                                    const Bf16* b, Shape<int, int, int>* shapes, const Bf16** ptr_a,
                                    const Bf16** ptr_b, StrideKMajor* strides) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
    const int start = e > 0 ? offsets[e - 1] : 0;
    const int m = max(offsets[e] - start, 0);
    shapes[e] = make_shape(m, N, K);
    ptr_a[e] = a + int64_t(start) * K;
    ptr_b[e] = b + int64_t(e) * N * K;
    strides[e] = StrideKMajor{int64_t(K), Int<1>{}, Int<0>{}};
  }
}

constexpr size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Returns false, having launched nothing, when CUTLASS cannot take the arguments.
template <class Config>
bool run_grouped(const Bf16* a, const Bf16* b, const at::Tensor& offsets, int E, int N, int K,
                 const EpilogueArgs& epilogue, cudaStream_t stream) {
  using Gemm = typename Config::Gemm;
  const int device = offsets.get_device();
  const c10::cuda::CUDAGuard guard(device);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);

  // Scratch: [shapes | ptr_a | ptr_b | strides | CUTLASS workspace]; the workspace size does not depend on
  // the pointers, so size it first with null ones.
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                {E, nullptr, nullptr},
                                {nullptr, nullptr, nullptr, nullptr},
                                epilogue,
                                hw};
  // With device-only problem shapes this checks the mode and the epilogue's pointers and strides.
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return false;
  const size_t shapes_bytes = align_up(sizeof(Shape<int, int, int>) * E);
  const size_t ptr_bytes = align_up(sizeof(void*) * E);
  const size_t stride_bytes = align_up(sizeof(StrideKMajor) * E);
  const size_t setup_bytes = shapes_bytes + 2 * ptr_bytes + stride_bytes;
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  at::Tensor scratch = at::empty({static_cast<int64_t>(setup_bytes + workspace_bytes)},
                                 at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  auto* base = static_cast<uint8_t*>(scratch.data_ptr());
  auto* shapes = reinterpret_cast<Shape<int, int, int>*>(base);
  auto* ptr_a = reinterpret_cast<const Bf16**>(base + shapes_bytes);
  auto* ptr_b = reinterpret_cast<const Bf16**>(base + shapes_bytes + ptr_bytes);
  auto* strides = reinterpret_cast<StrideKMajor*>(base + shapes_bytes + 2 * ptr_bytes);

  setup_groups_kernel<<<(E + 255) / 256, 256, 0, stream>>>(offsets.data_ptr<int32_t>(), E, N, K, a, b, shapes, ptr_a,
                                                           ptr_b, strides);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  args.problem_shape = {E, shapes, nullptr};  // device-only problem shapes
  args.mainloop = {ptr_a, strides, ptr_b, strides};
  Gemm gemm;
  TORCH_CHECK(gemm.initialize(args, workspace_bytes ? base + setup_bytes : nullptr, stream) ==
                  cutlass::Status::kSuccess,
              "ringkern: CUTLASS grouped MoE GEMM: initialize failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "ringkern: CUTLASS grouped MoE GEMM: launch failed");
  return true;
}

template <bool kSwiGLU>
bool dispatch(const Bf16* a, const Bf16* b, const at::Tensor& offsets, int E, int N, int K,
              const EpilogueArgs& epilogue, cudaStream_t stream) {
  return cooperative_tile() ? run_grouped<CooperativeTile<kSwiGLU>>(a, b, offsets, E, N, K, epilogue, stream)
                            : run_grouped<PingpongTile<kSwiGLU>>(a, b, offsets, E, N, K, epilogue, stream);
}

bool is_bf16_cuda_contiguous(const at::Tensor& t, int dim) {
  return t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.dim() == dim && t.is_contiguous();
}

// Common checks: TMA needs 16-byte aligned bases and row strides (K % 8 == 0), the epilogue N % 8 == 0.
bool supported(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets, int64_t S, int64_t E, int64_t N,
               int64_t K) {
  const int device = a.get_device();
  return offsets.is_cuda() && offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.is_contiguous() &&
         offsets.get_device() == device && w.get_device() == device && E >= 1 && offsets.size(0) == E &&
         S <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX && K > 0 && N > 0 && K % 8 == 0 && N % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
}

}  // namespace
#endif

bool grouped_gate_up_swiglu_sm90(const at::Tensor& x_sorted, const at::Tensor& w_gu, const at::Tensor& offsets,
                                 at::Tensor& gate_up_out, at::Tensor& act, cudaStream_t stream) {
#if !defined(RINGKERN_WITH_CUTLASS)
  return false;
#else
  if (!is_bf16_cuda_contiguous(x_sorted, 2) || !is_bf16_cuda_contiguous(w_gu, 3) ||
      !is_bf16_cuda_contiguous(gate_up_out, 2) || !is_bf16_cuda_contiguous(act, 2)) {
    return false;
  }
  const int64_t S = x_sorted.size(0), H = x_sorted.size(1), E = w_gu.size(0), N = w_gu.size(1);
  if (w_gu.size(2) != H || N % 2 != 0 || gate_up_out.size(0) != S || gate_up_out.size(1) != N ||
      act.size(0) != S || act.size(1) != N / 2 || gate_up_out.get_device() != x_sorted.get_device() ||
      act.get_device() != x_sorted.get_device() || !supported(x_sorted, w_gu, offsets, S, E, N, H)) {
    return false;
  }
  if (S == 0) return true;
  EpilogueArgs epilogue;
  epilogue.out = reinterpret_cast<Bf16*>(gate_up_out.data_ptr());
  epilogue.act = reinterpret_cast<Bf16*>(act.data_ptr());
  epilogue.offsets = offsets.data_ptr<int32_t>();
  epilogue.ld_out = N;
  epilogue.ld_act = N / 2;
  return dispatch<true>(reinterpret_cast<const Bf16*>(x_sorted.data_ptr()),
                        reinterpret_cast<const Bf16*>(w_gu.data_ptr()), offsets, int(E), int(N), int(H), epilogue,
                        stream);
#endif
}

#if defined(RINGKERN_WITH_CUTLASS)
namespace {

// The down GEMM of both calls below, given the epilogue's output fields: the input checks, then the launch.
bool run_down(const at::Tensor& act, const at::Tensor& w_down, const at::Tensor& offsets, const float* row_scale,
              EpilogueArgs epilogue, cudaStream_t stream) {
  if (!is_bf16_cuda_contiguous(act, 2) || !is_bf16_cuda_contiguous(w_down, 3)) return false;
  const int64_t S = act.size(0), I = act.size(1), E = w_down.size(0), H = w_down.size(1);
  if (w_down.size(2) != I || !supported(act, w_down, offsets, S, E, H, I)) return false;
  if (S == 0) return true;
  epilogue.row_scale = row_scale;
  epilogue.offsets = offsets.data_ptr<int32_t>();
  epilogue.ld_out = H;
  return dispatch<false>(reinterpret_cast<const Bf16*>(act.data_ptr()),
                         reinterpret_cast<const Bf16*>(w_down.data_ptr()), offsets, int(E), int(H), int(I), epilogue,
                         stream);
}

}  // namespace
#endif

bool grouped_down_sm90(const at::Tensor& act, const at::Tensor& w_down, const at::Tensor& offsets,
                       const float* row_scale, at::Tensor& y_sorted, cudaStream_t stream) {
#if !defined(RINGKERN_WITH_CUTLASS)
  return false;
#else
  if (!is_bf16_cuda_contiguous(y_sorted, 2) || act.dim() != 2 || w_down.dim() != 3 ||
      y_sorted.size(0) != act.size(0) || y_sorted.size(1) != w_down.size(1) ||
      y_sorted.get_device() != act.get_device()) {
    return false;
  }
  EpilogueArgs epilogue;
  epilogue.out = reinterpret_cast<Bf16*>(y_sorted.data_ptr());
  return run_down(act, w_down, offsets, row_scale, epilogue, stream);
#endif
}

bool grouped_down_combine_sm90(const at::Tensor& act, const at::Tensor& w_down, const at::Tensor& offsets,
                               const float* row_scale, const int32_t* sorted_slot, int k, at::Tensor& y32,
                               cudaStream_t stream) {
#if !defined(RINGKERN_WITH_CUTLASS)
  return false;
#else
  if (!y32.is_cuda() || y32.scalar_type() != at::kFloat || y32.dim() != 2 || !y32.is_contiguous() || k < 1 ||
      act.dim() != 2 || w_down.dim() != 3 || y32.size(1) != w_down.size(1) || y32.size(0) * k != act.size(0) ||
      y32.get_device() != act.get_device()) {
    return false;
  }
  EpilogueArgs epilogue;
  epilogue.combine_out = y32.data_ptr<float>();
  epilogue.sorted_slot = sorted_slot;
  epilogue.k = k;
  return run_down(act, w_down, offsets, row_scale, epilogue, stream);
#endif
}

}  // namespace ringkern::moe
