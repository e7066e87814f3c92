"""f32 GEMM throughput of PyTorch (MKL/oneDNN) and NumPy (OpenBLAS) at BERT-like shapes, 2 threads.

The Python side of the GEMM probe behind issue 6's choice of CPU GEMM (BENCHMARKS.md, "CPU"):
    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 .venv-py/bin/python benches/compare/gemm_probe.py
"""
import time

import numpy as np
import torch

torch.set_num_threads(2)
SHAPES = [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 768, 768),
          (2048, 768, 3072), (2048, 8, 384), (2048, 384, 8), (384, 2048, 384)]


def gflops(f, flops, warmup=3, reps=10):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return flops / sorted(times)[reps // 2] / 1e9


for m, k, n in SHAPES:
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(k, n).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2 * m * k * n
    print(f"{m}x{k}x{n}: numpy {gflops(lambda: a @ b, flops):.0f} GFLOP/s, "
          f"torch {gflops(lambda: ta @ tb, flops):.0f} GFLOP/s")
