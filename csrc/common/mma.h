// Warp-level tensor-core MMA shared by the decode kernels (few-rows MoE GEMMs, decode attention).
#pragma once
#include <cstdint>

namespace ringkern {

// d += a b with mma.sync m16n8k16 (bf16 inputs, fp32 accumulators): a = 16 x 16 (row-major fragments a0..a3),
// b = 16 x 8 (column-major fragments b0, b1), d = 16 x 8; fragment layouts as in the PTX ISA.
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

}  // namespace ringkern
