"""Shared test helpers: CUDA skips with the reason shown, seeded RNG."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on the GPU machine)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
