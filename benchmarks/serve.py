"""Generation throughput of ``tunelab serve``'s engine on SmolLM2: what unmerged adapters cost.

Four ways of answering the same batch of prompts (same max_tokens, eos ignored so every row
generates exactly max_tokens), each through the serving engine's batched ``generate`` path:

* ``base``: the plain base model;
* ``merged``: one adapter folded into the weights (``merge_and_unload``): a plain model again;
* ``unmerged``: the base with that adapter attached by peft, every row using it;
* ``mixed``: three adapters attached, the rows spread over them in one batch.

Reports tokens/s (median over ``--repeats`` after one warm-up run) and the overhead of
unmerged adapters as a ratio of times against the merged model.

    python benchmarks/serve.py [--batch 6] [--max-tokens 32] [--repeats 3] [--json out.json]

Adapters are random LoRAs (rank ``--rank`` on all linear layers) unless ``--adapter`` gives
real ones (up to three; the first is the one merged). About 2-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tunelab import adapters, models  # noqa: E402
from tunelab.serve.engine import Engine, GenRequest  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.",
           "Explain how a bicycle works.",
           "What should I pack for a week of hiking?",
           "Describe the water cycle to a child.",
           "Give me three ideas for a birthday party.",
           "Why is the sky blue?",
           "List some uses of a paper clip.",
           "How do I make a cup of tea?"]


def random_adapter(base_dir: str, out: Path, seed: int, rank: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    return out


def measure(engine: Engine, rows: list[str], prompts: list[list[int]], max_tokens: int,
            repeats: int) -> dict:
    reqs = [GenRequest(model=m, prompt_ids=p, max_tokens=max_tokens, ignore_eos=True)
            for m, p in zip(rows, prompts, strict=True)]
    engine.max_batch_size = len(reqs)
    engine.start()
    batches_before = engine.stats.batches
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = engine.generate(reqs)
        elapsed = time.perf_counter() - start
        tokens = sum(c.completion_tokens for c in out)
        assert tokens == len(reqs) * max_tokens, tokens
        if i:  # the first run warms up
            times.append(elapsed)
    batches = engine.stats.batches - batches_before
    engine.close()
    assert batches == repeats + 1, f"expected one batch per run, got {batches}"
    median = statistics.median(times)
    return {"seconds": median, "tokens": len(reqs) * max_tokens,
            "tokens_per_s": len(reqs) * max_tokens / median, "runs": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", action="append", default=[],
                        help="a real adapter folder (repeatable, up to 3)")
    parser.add_argument("--batch", type=int, default=6, help="rows per batch")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    base_dir = models.local_folder(models.resolve_model(args.model))
    scratch = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    paths = [Path(p) for p in args.adapter[:3]]
    for i in range(len(paths), 3):
        paths.append(random_adapter(base_dir, scratch / f"lora{i}", seed=i, rank=args.rank))
    names = ["x", "y", "z"]

    def load() -> tuple:
        return models.load_model(args.model, device=args.device)

    model, tok = load()
    prompt_ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True),
                      add_special_tokens=False).input_ids
                  for p in (PROMPTS * args.batch)[: args.batch]]
    results: dict[str, dict] = {}
    base_engine = Engine(model, tok, base_name="base")
    results["base"] = measure(base_engine, ["base"] * args.batch, prompt_ids, args.max_tokens,
                              args.repeats)
    del base_engine, model
    gc.collect()

    model, tok = load()
    merged = adapters.merge_adapter(adapters.load_adapter(model, paths[0], name="x"))
    results["merged"] = measure(Engine(merged, tok, base_name="base"), ["base"] * args.batch,
                                prompt_ids, args.max_tokens, args.repeats)
    del merged, model
    gc.collect()

    model, tok = load()
    engine = Engine(model, tok, base_name="base")
    engine.load_adapter("x", paths[0])
    results["unmerged"] = measure(engine, ["x"] * args.batch, prompt_ids, args.max_tokens,
                                  args.repeats)
    for name, path in zip(names[1:], paths[1:], strict=True):
        engine.load_adapter(name, path)
    rows = [names[i % 3] for i in range(args.batch)]
    results["mixed"] = measure(engine, rows, prompt_ids, args.max_tokens, args.repeats)
    del engine, model
    gc.collect()

    merged_s = results["merged"]["seconds"]
    labels = {"base": "base model", "merged": "adapter merged into the weights",
              "unmerged": "adapter unmerged (peft), 1 adapter",
              "mixed": "3 adapters mixed in one batch (peft)"}
    print(f"\n{args.model}, batch {args.batch} x {args.max_tokens} new tokens, "
          f"median of {args.repeats} (device {args.device}, {torch.get_num_threads()} threads)")
    print(f"{'config':<40} {'tokens/s':>9} {'s/batch':>8} {'time vs merged':>15}")
    for key, label in labels.items():
        r = results[key]
        r["time_vs_merged"] = r["seconds"] / merged_s
        print(f"{label:<40} {r['tokens_per_s']:9.1f} {r['seconds']:8.2f} "
              f"{r['time_vs_merged']:14.2f}x")
    overhead = results["unmerged"]["seconds"] / merged_s
    mixed = results["mixed"]["seconds"] / merged_s
    print(f"\nunmerged adapter overhead: {overhead:.2f}x the merged model's time "
          f"({(overhead - 1) * 100:+.0f}%); three mixed adapters: {mixed:.2f}x "
          f"({(mixed - 1) * 100:+.0f}%)")
    total = time.perf_counter() - started
    print(f"benchmark took {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "batch": args.batch, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "rank": args.rank,
            "results": results, "unmerged_overhead_ratio": overhead,
            "mixed_overhead_ratio": mixed, "seconds": total}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
