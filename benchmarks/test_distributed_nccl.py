"""The checks of python_tests/test_distributed.py on GPUs with NCCL.

Each rank runs every check on cuda:LOCAL_RANK (fp32, tiny preset) against the single-process result on
its own GPU; the greedy-decode check also runs the Engine's CUDA-graph decode with the expert-parallel
all-reduce captured in the graph. Prints one line per check and exits 1 if any rank failed one.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 benchmarks/test_distributed_nccl.py      # also 4, 8
"""
from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))
import test_distributed as checks  # noqa: E402

from ringkern.distributed import init_mesh, mesh  # noqa: E402

CHECK_TIMEOUT_S = 120  # a hung check prints every thread's stack and ends the process
REQUIRED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def shared_tmpdir() -> Path:
    """One temporary directory for all ranks (checkpoints), made by rank 0."""
    box = [tempfile.mkdtemp(prefix="ringkern-nccl-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def main() -> int:
    wrong = {k: os.environ.get(k) for k, v in REQUIRED_ENV.items() if os.environ.get(k) != v}
    if wrong:
        raise SystemExit(f"set {REQUIRED_ENV} (NVLink multicast off); got {wrong}")
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA GPUs; the CPU/gloo versions are python_tests/test_distributed.py")
    checks.DEVICE = mesh.local_device("cuda")
    init_mesh("cuda")  # starts NCCL from the torchrun environment
    rank, world = dist.get_rank(), dist.get_world_size()
    root = shared_tmpdir()
    failed = 0
    for name, check in checks.CHECKS.items():
        work = root / name
        work.mkdir(exist_ok=True)
        faulthandler.dump_traceback_later(CHECK_TIMEOUT_S, exit=True)
        try:
            check(rank, world, work)
            status = "ok"
        except Exception:
            status = "FAILED\n" + traceback.format_exc()
            failed += 1
        faulthandler.cancel_dump_traceback_later()
        print(f"[rank {rank}/{world}] {name}: {status}", flush=True)
    flags = torch.tensor([failed], device=checks.DEVICE)
    dist.all_reduce(flags)
    mesh.shutdown()
    return 1 if int(flags) else 0


if __name__ == "__main__":
    raise SystemExit(main())
