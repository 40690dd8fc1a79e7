"""Concurrent requests for different adapters share batches and get the answers they would get
alone; memory stays flat over repeated rounds."""

from __future__ import annotations

import asyncio
import gc

import torch

from tests.serve.conftest import rss_bytes
from tunelab.serve.engine import BASE

MODELS = ["tiny", "a", "b", "c"]
TEXTS = ["capital of France?", "hello", "Tallinn is the capital of Estonia. Where is it?",
         "JSON record", "A quick brown fox jumps over the lazy dog.", "0 1 2 3",
         "Fine-tuning adapts a model to a task. Why?", "question answer"]
MAX_TOKENS = [10, 6, 12, 8]


def requests() -> list[dict]:
    """32 requests: 8 prompts of different lengths x (base + 3 adapters), mixed max_tokens,
    a quarter of them streamed and a few sampled with a seed."""
    out = []
    for i in range(32):
        model, text = MODELS[i % 4], TEXTS[i // 4]
        req = {"model": model, "text": text, "max_tokens": MAX_TOKENS[(i // 4) % 4],
               "temperature": 0.0, "seed": None, "stream": i % 4 == (i // 4) % 4}
        if i in (5, 18, 27):
            req.update(temperature=0.9, seed=100 + i)
        out.append(req)
    return out


async def ask(client, req: dict) -> tuple[str, str, int]:
    kwargs = dict(model=req["model"], messages=[{"role": "user", "content": req["text"]}],
                  max_tokens=req["max_tokens"], temperature=req["temperature"])
    if req["seed"] is not None:
        kwargs["seed"] = req["seed"]
    if not req["stream"]:
        r = await client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    text, finish, used = [], None, None
    async for chunk in await client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            used = chunk.usage.completion_tokens
    return "".join(text), finish, used


async def ask_all(base_url: str, reqs: list[dict]) -> list[tuple[str, str, int]]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                           timeout=300) as client:
        return list(await asyncio.gather(*(ask(client, r) for r in reqs)))


@torch.no_grad()
def margins_and_deviation(engine, reqs: list[dict], answers: list[tuple]) -> tuple[float, float]:
    """Along each greedy answer: the smallest gap between the two best logits, and the largest
    difference between a row's logits computed alone and inside one left-padded batch mixing
    all adapters. Tokens can only differ between batched and alone where the gap is smaller
    than the difference."""
    rows, names, spans = [], [], []
    for req, (text, finish, _) in zip(reqs, answers, strict=True):
        if req["temperature"] > 0:
            continue
        prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": req["text"]}]))
        answer = engine.tokenize(text)
        if engine.tokenizer.decode(answer) != text:  # text does not round-trip: skip it
            continue
        answer += [engine.tokenizer.eos_token_id] if finish == "stop" else []
        rows.append(prompt + answer)
        names.append(engine.adapter_for(req["model"]))
        spans.append((len(prompt) - 1, len(prompt) + len(answer) - 1))
    width = max(len(r) for r in rows)
    pad = engine.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = engine.model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    margin, deviation = float("inf"), 0.0
    for i, (row, name, (lo, hi)) in enumerate(zip(rows, names, spans, strict=True)):
        alone = engine.model(input_ids=torch.tensor([row]), adapter_names=[name]).logits[0]
        shift = width - len(row)
        deviation = max(deviation, float((batched[i, shift + lo:shift + hi] -
                                          alone[lo:hi]).abs().max()))
        top2 = alone[lo:hi].topk(2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    return margin, deviation


def test_32_concurrent_requests_across_adapters_match_serial_answers(server, engine):
    reqs = requests()
    # each request alone (one at a time, so each is a batch of one)
    alone = [asyncio.run(ask_all(server, [r]))[0] for r in reqs]
    assert len({a[0] for a in alone}) > 8  # the adapters really answer differently

    # the premise of comparing batched with unbatched greedy answers token for token
    margin, deviation = margins_and_deviation(engine, reqs, alone)
    assert margin > 10 * deviation, (margin, deviation)

    before = engine.stats.as_dict()
    rss = []
    for _ in range(4):
        got = asyncio.run(ask_all(server, reqs))
        assert got == alone
        gc.collect()
        rss.append(rss_bytes())
    after = engine.stats.as_dict()

    # they were batched: fewer generate calls than requests, with adapters mixed in a batch
    batches = after["batches"] - before["batches"]
    assert after["rows"] - before["rows"] == 4 * 32
    assert batches < 4 * 32 / 2
    assert after["max_batch_rows"] >= 8
    assert after["mixed_batches"] > before["mixed_batches"]
    # memory is flat: after the first round, repeated rounds add (almost) nothing
    growth = max(rss[1:]) - rss[0]
    assert growth < 40 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB: {rss}"


def test_a_batch_mixing_every_adapter_and_the_base_uses_one_model(engine):
    """One copy of the base: all adapters are peft adapters of the same module tree."""
    assert set(engine.model.peft_config) == {"a", "b", "c"}
    n_base = sum(p.numel() for n, p in engine.model.named_parameters() if "lora_" not in n)
    plain = sum(p.numel() for p in engine.model.get_base_model().parameters())
    assert n_base < plain  # lora weights are the only extra parameters
    assert engine.adapter_for("tiny") == BASE


def test_rows_stop_at_eos_independently_and_ignore_eos(tiny_model_dir, adapter_dirs):
    """One row ending its turn early leaves the others as they would be alone."""
    from tunelab.serve.engine import Engine, GenRequest

    eng = Engine.load(str(tiny_model_dir), [("a", str(adapter_dirs["a"]))], name="tiny",
                      device="cpu", batch_wait_ms=50).start()
    try:
        first = eng.tokenize(eng.render_chat([{"role": "user", "content": "hello"}]))
        other = eng.tokenize(eng.render_chat([{"role": "user", "content": "JSON record"}]))
        full = eng.generate([GenRequest("a", first, max_tokens=8)])[0]
        assert full.finish_reason == "length" and len(full.token_ids) == 8
        eos = full.token_ids[2]  # pretend the third token of this answer ends the turn
        assert eos not in full.token_ids[:2]
        eng.tokenizer.eos_token = eng.tokenizer.convert_ids_to_tokens(eos)
        stopped = eng.generate([GenRequest("a", first, max_tokens=8)])[0]
        assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:2]
        alone = eng.generate([GenRequest("tiny", other, max_tokens=8)])[0]
        together = eng.generate([GenRequest("a", first, max_tokens=8),
                                 GenRequest("tiny", other, max_tokens=8)])
        assert eng.stats.max_batch_rows == 2
        assert together == [stopped, alone]
        ignored = eng.generate([GenRequest("a", first, max_tokens=8, ignore_eos=True),
                                GenRequest("tiny", other, max_tokens=8)])
        assert ignored[0].token_ids == full.token_ids and ignored[1] == alone
    finally:
        eng.close()


def test_a_cancelled_request_stops_its_row_only(engine):
    from tunelab.serve.engine import GenRequest

    prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": "hello"}]))
    handles = []

    def cancel_after_two(kind, payload):
        deltas.append(kind)
        if deltas.count("delta") == 2:
            handles[0].cancel()

    deltas: list[str] = []
    handles.append(engine.submit(GenRequest("a", prompt, max_tokens=40), cancel_after_two))
    other = engine.submit(GenRequest("b", prompt, max_tokens=20))
    cancelled = handles[0].wait(60)
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 40
    assert other.wait(60) == engine.generate([GenRequest("b", prompt, max_tokens=20)])[0]


def test_a_client_leaving_mid_stream_does_not_disturb_the_server(server, client):
    import httpx

    body = {"model": "c", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_lines())
        assert first.startswith("data: {")
    # the connection is gone; the server goes on serving
    reply = client.chat.completions.create(model="c", max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "hello"}])
    assert reply.usage.completion_tokens <= 5
