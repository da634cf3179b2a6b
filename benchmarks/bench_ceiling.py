"""The GPU's sustained bf16 GEMM ceiling next to its burst one, with the SM clock and power while it runs.

Under a few seconds of back-to-back GEMMs the lent H200 holds its 700 W power cap and clocks the SMs down, so
a GEMM-bound benchmark of ~100 ms per call (the fused log-prob loss) runs against a lower ceiling than a
10-call median of the same GEMM shows. This script measures both for cuBLAS bf16 8192^3 and for the
log-prob pass's grad_hidden shape ([T, V] @ [V, H] with T = H = 4096, V = 157184), sampling nvidia-smi during
the sustained runs. Prints one line per workload; writes JSON to $OUT/bench_ceiling.json when OUT is set.

    python benchmarks/bench_ceiling.py [--seconds 2.5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time

import torch

from timing import median_ms

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def smi_id() -> str:
    """nvidia-smi's index of the current device: CUDA_VISIBLE_DEVICES' entry for it when that lists indices."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    index = torch.cuda.current_device()
    return visible[index] if index < len(visible) and visible[index].isdigit() else str(index)


def smi(query: str) -> str:
    """One nvidia-smi reading of `query` for the current device ('' when nvidia-smi is missing)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={smi_id()}", f"--query-gpu={query}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def sustained(fn, seconds: float, samples: int = 5) -> tuple[float, list[str]]:
    """Mean ms per fn() over back-to-back calls for `seconds`, and nvidia-smi readings taken meanwhile
    (the first after 0.5 s)."""
    readings: list[str] = []

    def sample():
        time.sleep(0.5)
        while len(readings) < samples:
            readings.append(smi(QUERY))
            time.sleep(max(0.0, (seconds - 0.5) / samples - 0.05))

    fn()
    torch.cuda.synchronize()
    sampler = threading.Thread(target=sample)
    sampler.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.time()
    start.record()
    while time.time() - t0 < seconds:
        fn()
        calls += 1
        if calls % 4 == 0:  # keep the host within a few calls of the GPU
            torch.cuda.synchronize()
    end.record()
    end.synchronize()
    sampler.join()
    return start.elapsed_time(end) / calls, readings


def measure(name: str, fn, flops: float, seconds: float) -> dict:
    burst = median_ms(fn, 10)
    ms, readings = sustained(fn, seconds)
    row = {"workload": name, "burst_ms": burst, "burst_tflops": flops / burst / 1e9, "sustained_ms": ms,
           "sustained_tflops": flops / ms / 1e9, "smi_sm_mhz_w_throttle": readings}
    print(f"{name}: burst {row['burst_tflops']:.0f} TFLOP/s, sustained {row['sustained_tflops']:.0f} TFLOP/s "
          f"over {seconds:.1f} s; nvidia-smi (SM MHz, W, throttle reasons): {' | '.join(readings)}", flush=True)
    return row


def square_gemm(seconds: float) -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return measure("cuBLAS bf16 8192^3", lambda: a @ b, 2 * 8192 ** 3, seconds)


def grad_hidden_gemm(seconds: float) -> dict:
    T, H, V = 4096, 4096, 157184
    d = (torch.randn(T, V, device="cuda") * 1e-3).to(torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") * 0.03).to(torch.bfloat16)
    return measure("grad_hidden [4096 x 157184] @ [157184 x 4096]", lambda: d @ w, 2 * T * H * V, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="length of each sustained run")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "limits": smi("clocks.max.sm,power.limit"), "rows": []}
    print(f"{results['gpu']}: max SM MHz, power limit W: {results['limits']}")
    results["rows"].append(square_gemm(args.seconds))
    results["rows"].append(grad_hidden_gemm(args.seconds))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_ceiling.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
