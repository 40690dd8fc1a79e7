"""Token-by-token generation on a 4-bit base: bitsandbytes' CPU inference layout vs the
trainable layout tunelab pins for training (``quant.keep_trainable_layout``).

    python benchmarks/generate_4bit_layout.py --model DIR [--tokens 16] [--rounds 3]

On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight on its first no-grad
pass into a layout its fused ``gemv_4bit`` reads; pinned, every generated token instead
dequantizes every weight into fp32 and multiplies. Both models are loaded in this process,
the same prompt is generated greedily from each, alternating, ``--rounds`` times; the JSON
has each mode's median seconds per token, the ratio and whether the tokens agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / "generate_4bit_layout.json")
    args = parser.parse_args()
    import torch

    from tunelab.models import load_model

    models = {}
    for mode in ("pinned", "inference"):
        model, tok = load_model(args.model, device="cpu", dtype="fp32", bits=4)
        if mode == "inference":  # undo the pin before any forward pass
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = True
        models[mode] = model.eval()
    ids = tok("Write one sentence about the sea.", return_tensors="pt").input_ids
    times: dict[str, list[float]] = {m: [] for m in models}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for mode, model in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                     do_sample=False)
            times[mode].append((time.perf_counter() - start) / args.tokens)
            outputs[mode] = out[0, ids.shape[1]:].tolist()
    result = {"model": str(args.model), "tokens": args.tokens, "rounds": args.rounds,
              "seconds_per_token": {m: statistics.median(t) for m, t in times.items()},
              "all_seconds_per_token": times,
              "same_tokens": outputs["pinned"] == outputs["inference"]}
    result["speedup_inference_layout"] = (result["seconds_per_token"]["pinned"]
                                          / result["seconds_per_token"]["inference"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
