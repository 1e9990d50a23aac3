"""Achievable fp32 / bf16 matrix-multiply throughput at the ViT's MLP shape, and the ViT's FLOPs per eval forward.

    python experiments/performance/gemm_peak.py

The floor under the fp32 evaluation forward (docs/PERFORMANCE.md): the ViT's FLOPs at this throughput.
"""

import time

import torch


def rate(dtype: torch.dtype, m: int = 2748, k: int = 768, n: int = 3072, reps: int = 20) -> float:
    """GFLOP/s of an (m, k) @ (k, n) product after a warm-up."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


if __name__ == "__main__":
    for dtype in (torch.float32, torch.bfloat16):
        print(dtype, "GFLOP/s", round(rate(dtype), 1))
    tokens, dim, blocks = 1374, 768, 12  # 1 class + 4 registers + 37 x 37 patches at 518 px
    linear = 2 * 2 * tokens * blocks * (4 * dim * dim + 2 * dim * 4 * dim)  # batch 2
    attention = 2 * 2 * blocks * 2 * tokens**2 * dim  # q k^T and p v, batch 2
    print("ViT-B/14 eval forward, 518 px, batch 2: linear GFLOP", round(linear / 1e9, 1),
          "attention GFLOP", round(attention / 1e9, 1))
