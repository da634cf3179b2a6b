// Every ringkern op schema, declared once, and the Python module that reports the build.
// CUDA implementations register themselves next to their kernels (TORCH_LIBRARY_IMPL in the .cu files);
// the CPU implementations, fake (meta) kernels and autograd formulas are registered in Python
// (ringkern/ops/_library.py), where the CPU kernels are the pure-PyTorch references.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(ringkern, m) {
  // RMSNorm over the last dim; fp32 math, output in x's dtype.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // Gradients of rms_norm: (grad_x, grad_weight).
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
}

#ifndef RINGKERN_CUDA_ARCHS
#define RINGKERN_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringkern native ops (registered under torch.ops.ringkern)";
#ifdef RINGKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = RINGKERN_CUDA_ARCHS;
}
