"""This machine's dense fp32 matmul throughput: the ceiling a training step can approach.

    python benchmarks/matmul_peak.py            # prints GFLOP/s (median of repeats)
    python benchmarks/matmul_peak.py --json out.json

A square ``n x n @ n x n`` matmul does ``2 n^3`` FLOPs. The peak is the best size's median
over repeats, at torch's default thread count (all cores). The shapes of a training step
(``tokens x 576 @ 576 x 1536`` for SmolLM2) are also timed, so one can see how much of the
peak those narrower matrices can reach at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def time_matmul(m: int, k: int, n: int, repeats: int = 7, dtype=torch.float32) -> float:
    """Median GFLOP/s of ``(m x k) @ (k x n)``."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm up: first call pays allocation and kernel selection
    flops = 2.0 * m * k * n
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 7,
                shapes: bool = True) -> dict:
    """The best median GFLOP/s over square sizes, plus (``shapes``) the SmolLM2 step shapes."""
    square = {n: time_matmul(n, n, n, repeats) for n in sizes}
    if not shapes:
        return {"threads": torch.get_num_threads(), "peak_gflops": max(square.values()),
                "square_gflops": {str(k): v for k, v in square.items()}, "shape_gflops": {}}
    shape_rates = {  # tokens x in @ in x out, the linear layers of a SmolLM2 step at ~2k tokens
        "2048x576@576x1536 (mlp up)": time_matmul(2048, 576, 1536, repeats),
        "2048x1536@1536x576 (mlp down)": time_matmul(2048, 1536, 576, repeats),
        "2048x576@576x576 (q/o proj)": time_matmul(2048, 576, 576, repeats),
    }
    return {"threads": torch.get_num_threads(), "peak_gflops": max(square.values()),
            "square_gflops": {str(k): v for k, v in square.items()},
            "shape_gflops": shape_rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = matmul_peak(repeats=args.repeats)
    print(f"fp32 matmul peak on {result['threads']} threads: {result['peak_gflops']:.1f} GFLOP/s")
    for name, rate in {**result["square_gflops"], **result["shape_gflops"]}.items():
        print(f"  {name:>32}: {rate:7.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
