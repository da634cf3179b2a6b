// Programmatic dependent launch (sm_90) for the decode step's kernels. A decode step is a chain of short
// kernels, each waiting for the previous one; between two of them the GPU idles for the launch gap, the
// new kernel's ramp-up and the first loads' latency. A kernel launched with launch_dependent() may start while
// the previous kernel in the stream drains (its blocks get scheduled, its launch latency is hidden) and calls
// wait_for_previous_grid() before it reads anything that kernel wrote.
//
// Each such kernel starts with allow_next_grid(), so that the next kernel, once every block of this one runs,
// may be scheduled beside it.
//
// Rules for a kernel launched this way: every block calls wait_for_previous_grid() before it reads the previous
// kernel's outputs and before it exits (so a kernel's completion still implies its predecessors'), and it
// writes nothing before that call. RINGKERN_PDL=0 launches normally (the device instructions are then no-ops).
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include <c10/cuda/CUDAException.h>

namespace ringkern {

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

inline bool pdl_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("RINGKERN_PDL");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch (when pdl_enabled()).
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = pdl_enabled() ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace ringkern
