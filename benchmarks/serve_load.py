"""``tunelab serve`` under load: the 1,000-request mix of ``tests/serve/test_serve_load.py``.

About 60% of the requests are valid generations (chat and completions, a third of them
streamed, max_tokens 4-8, spread over the base and two adapters) plus model listings. The
other 40% are abuse: malformed JSON and HTTP, wrong types, oversized bodies, traversal names,
bad API keys, and so on. They are sent ``--concurrency`` at a time to a ``tunelab serve``
process started here. The script prints the latency of the valid generations (p50/p90/p99,
from sending a request to the end of its answer, streamed or not), the throughput, the
statuses, and the server's resident memory before, at peak and after. Every answer is
checked as in the test, and problems are listed.

    python benchmarks/serve_load.py                        # tiny Llama built here, ~1 minute
    python benchmarks/serve_load.py --model smollm2-135m   # the real model, random adapters
    python benchmarks/serve_load.py --requests 2000 --concurrency 64 --json out.json

It needs the test extras (httpx; ``make test`` installs them), and imports the request mix
from ``tests/serve/load.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.serve.load import ProcessWatch, build_cases, run_load, serve_process  # noqa: E402

KEY = "benchmark-key"


def prepare(model: str, work: Path) -> tuple[str, str, dict[str, Path], Path, int]:
    """The base (built here when 'tiny'), two random adapters, and an admin library."""
    from tests.serve.conftest import make_random_adapter

    if model == "tiny":
        from tests.conftest import build_tiny_model, build_tiny_tokenizer

        base = work / "tiny"
        base.mkdir()
        build_tiny_model(base, len(build_tiny_tokenizer(base)))
        base_dir, name, std = base, "tiny", 0.5
    else:
        from tunelab import models

        base_dir = models.local_folder(models.resolve_model(model))
        name, std = "base", 0.05
    adapters = {n: make_random_adapter(base_dir, work / n, seed, "all-linear", 8, std=std)
                for n, seed in (("a", 1), ("b", 2))}
    lib = work / "library"
    make_random_adapter(base_dir, lib / "d", 3, ["q_proj"], 2, std=std)
    (lib / "empty").mkdir()
    outside = work / "outside"
    outside.mkdir()
    os.symlink(outside, lib / "sneaky")
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(base_dir), "max_position_embeddings", 2048)
    return str(base_dir), name, adapters, lib, context


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="'tiny' (a 2-layer Llama built here) or a model for tunelab serve")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--abuse-share", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()

    limit, body_limit = 16, 64 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        base, name, adapters, lib, context = prepare(args.model, work)
        common = dict(models=[name, "a", "b"], api_key=KEY, outside=str(work / "outside"),
                      max_tokens_limit=limit, max_request_bytes=body_limit,
                      context_length=context, abuse_share=args.abuse_share)
        serve_args = ["--name", name, "--device", "cpu", "--threads", str(args.threads),
                      "--log-level", "warning", "--api-key", KEY, "--admin",
                      "--adapter-dir", str(lib), "--max-tokens-limit", str(limit),
                      "--max-request-bytes", str(body_limit)]
        with serve_process(base, adapters, log=work / "serve.log", args=serve_args) \
                as (url, proc):
            print(f"server up after {time.perf_counter() - started:.1f} s; warming up with "
                  f"{args.warmup} requests", flush=True)
            watch = ProcessWatch(proc.pid)
            run_load(url, build_cases(args.warmup, seed=args.seed + 1, **common),
                     args.concurrency)
            rss_before, cpu_before = watch.rss(), watch.cpu_seconds()
            with watch:
                report = run_load(url, build_cases(args.requests, seed=args.seed, **common),
                                  args.concurrency)
            rss_after, cpu = watch.rss(), watch.cpu_seconds() - cpu_before
        errors = [line for line in (work / "serve.log").read_text().splitlines()
                  if "Traceback" in line or "Exception in ASGI" in line]

    report["model"] = args.model
    report["server"] = {"rss_before_mib": round(rss_before / 2**20, 1),
                        "rss_peak_mib": round(watch.peak / 2**20, 1),
                        "rss_after_mib": round(rss_after / 2**20, 1),
                        "cpu_s": round(cpu, 1), "torch_threads": args.threads}
    report["server_tracebacks"] = len(errors)
    lat = report["latency_ms"]
    print(f"\n{report['requests']} requests ({report['generations']} generations, "
          f"{report['requests'] - report['generations']} other or abusive), "
          f"concurrency {args.concurrency}, model {args.model}")
    print(f"wall {report['wall_s']} s: {report['requests_per_s']} requests/s, "
          f"{report['generations_per_s']} generations/s, "
          f"{report['completion_tokens_per_s']} completion tokens/s")
    print("latency of valid generations (ms):")
    print(f"  {'':18}{'n':>6}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for label, row in [("all", lat), *report["latency_ms_by_kind"].items(),
                       ("(errors)", report["error_latency_ms"])]:
        print(f"  {label:18}{row['n']:>6}{row['p50']:>9}{row['p90']:>9}{row['p99']:>9}"
              f"{row['max']:>9}")
    print(f"statuses: {report['statuses']}")
    s = report["server"]
    print(f"server RSS: {s['rss_before_mib']} MiB before, {s['rss_peak_mib']} peak, "
          f"{s['rss_after_mib']} after; server CPU {s['cpu_s']} s in {report['wall_s']} s "
          f"({os.cpu_count()} cores here)")
    print(f"bad answers: {len(report['problems'])}; server tracebacks: {len(errors)}")
    for problem in report["problems"][:20]:
        print("  " + problem)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["problems"] or errors else 0


if __name__ == "__main__":
    sys.exit(main())
