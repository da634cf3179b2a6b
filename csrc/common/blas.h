// The one cuBLAS GEMM entry point of the native ops (the at::cuda::blas templates are not exported from
// libtorch_cuda, so cuBLAS is called directly, on the current stream through ATen's handle).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <cublas_v2.h>

#include "check.h"

#include <limits>
#include <type_traits>

namespace ringkern {

template <typename T>
constexpr cudaDataType_t cuda_dtype() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>, "fp32 or bf16 operands");
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

inline int blas_int(int64_t v, const char* what) {
  RK_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "ringkern: GEMM ", what, " = ", v,
           " exceeds cuBLAS's 32-bit sizes");
  return static_cast<int>(v);
}

// C (+)= op(A) @ op(B) in column-major terms on row-major buffers (each call site spells its shapes),
// A and B of type T, C of type C, fp32 accumulation.
template <typename T, typename C>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          float beta, C* c, int64_t ldc) {
  const float alpha = 1.f;
  const cublasStatus_t status = cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), ta == 't' ? CUBLAS_OP_T : CUBLAS_OP_N,
      tb == 't' ? CUBLAS_OP_T : CUBLAS_OP_N, blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"), &alpha, a,
      cuda_dtype<T>(), blas_int(lda, "lda"), b, cuda_dtype<T>(), blas_int(ldb, "ldb"), &beta, c, cuda_dtype<C>(),
      blas_int(ldc, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  RK_CHECK(status == CUBLAS_STATUS_SUCCESS, "ringkern: cublasGemmEx failed with status ", static_cast<int>(status));
}

}  // namespace ringkern
