// The weight-gradient GEMM of the chunked pass on Hopper, with CUTLASS 3 (see sm90_gemm.cu).
#pragma once
#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ringkern::logprob {

// grad_weight [V, H] fp32 row-major = d^T [V, rows] @ hidden [rows, H] + beta * grad_weight, where d is the
// chunk's bf16 gradient [rows, V] with row stride ld_d elements. Returns false, having launched nothing,
// when the build has no CUTLASS or the kernel cannot take these pointers and strides (the caller then
// uses cuBLAS).
bool grad_weight_gemm_sm90(const c10::BFloat16* hidden, const c10::BFloat16* d, int64_t rows, int64_t ld_d,
                           int64_t H, int64_t V, float beta, float* grad_weight, cudaStream_t stream);

}  // namespace ringkern::logprob
