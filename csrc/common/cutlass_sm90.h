// The CUTLASS 3 (sm90) headers every CUTLASS kernel file here uses, and what those files share. Include it
// only under RINGKERN_WITH_CUTLASS, after the ATen headers.
#pragma once

// CUTLASS's device code without assert(): a call to the assert handler inside the kernel splits its wgmma
// pipeline (ptxas C7510: the wgmma instructions are then serialized).
#ifndef NDEBUG
#define NDEBUG
#include <cassert>
#endif
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/pipeline/pipeline.hpp>

#include <map>
#include <mutex>

namespace ringkern {

// SMs of a device, queried once: CUTLASS's persistent schedulers size their grids by it.
inline int sm_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it == counts.end()) {
    it = counts.emplace(device, cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device)).first;
  }
  return it->second;
}

}  // namespace ringkern
