"""Kernel-level levers of the LoRA step, each A/B'd in isolation with paired timings.

    python benchmarks/kernel_levers.py [--pairs 40] [--json out.json]

Whole-step benchmarks (``train_levers.py``) cannot resolve a few percent on a shared 2-core
VM whose speed moves by +-15% from one minute to the next. Here each lever is timed on the
one piece of the step it changes, the two variants alternating call by call (the order
flipping every pair), and the result is the median of the per-pair ratios.

* **output layer**: :class:`tunelab.loss.ChunkedCrossEntropy` (forward and the input
  gradient it stores) over SmolLM2's 49152 x 576 output layer, for a varying number of target
  rows as in real steps, with ``h W^T`` through oneDNN (``ONEDNN = True``) or MKL (``@``).

(A second lever was measured the same way and dropped: sibling projections reading one input,
q/k/v and gate/up, sharing one LoRA down-projection matmul ``x [A_q; A_k; A_v]^T``: their
LoRA products alone were 1.5x faster, a decoder layer's forward and backward x1.00-1.02.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "src"))


def paired(a: Callable[[], None], b: Callable[[], None], pairs: int) -> dict:
    """Median seconds of ``a`` and ``b`` and the median of the per-pair ratios a/b."""
    a(), b()  # warm both
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(pairs):
        for name in ("a", "b") if i % 2 else ("b", "a"):
            fn = a if name == "a" else b
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = sorted(x / y for x, y in zip(times["a"], times["b"], strict=True))
    return {"a_s": statistics.median(times["a"]), "b_s": statistics.median(times["b"]),
            "ratio": statistics.median(ratios), "ratio_q25": ratios[len(ratios) // 4],
            "ratio_q75": ratios[3 * len(ratios) // 4]}


def output_layer(pairs: int) -> dict:
    from tunelab.loss import ChunkedCrossEntropy

    torch.manual_seed(0)
    weight = torch.randn(49152, 576) * 0.05
    sizes = [450, 611, 389, 702]  # target rows of a few steps: several last-chunk shapes
    inputs = [(torch.randn(n, 576, requires_grad=True), torch.randint(0, 49152, (n,)))
              for n in sizes]
    step = {"k": 0}

    def run(onednn: bool) -> Callable[[], None]:
        def call() -> None:
            # both calls of a pair (and of the warm-up) see the same input
            hidden, targets = inputs[step["k"] // 2 % len(inputs)]
            step["k"] += 1
            ChunkedCrossEntropy.ONEDNN = onednn
            ChunkedCrossEntropy.apply(hidden, weight, targets).backward()
        return call

    result = paired(run(False), run(True), pairs)
    ChunkedCrossEntropy.ONEDNN = True
    return {"mkl_s": result["a_s"], "onednn_s": result["b_s"], "speedup": result["ratio"],
            "speedup_q25": result["ratio_q25"], "speedup_q75": result["ratio_q75"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lever = output_layer(args.pairs)
    print(f"output layer: MKL {lever['mkl_s'] * 1e3:.1f} ms, oneDNN {lever['onednn_s'] * 1e3:.1f} "
          f"ms per call (medians); x{lever['speedup']:.3f}, interquartile range "
          f"{lever['speedup_q25']:.3f}-{lever['speedup_q75']:.3f} over {args.pairs} pairs")
    results = {"threads": torch.get_num_threads(), "pairs": args.pairs, "output_layer": lever}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
