"""The OpenAI-compatible API through the official ``openai`` client, on a live loopback server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.conftest import chat
from tunelab import adapters, models
from tunelab.generate import GenerationSettings, build_prompt, generate

PROMPT = "capital of France?"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs):
    """``tunelab generate`` on its own copy of the model: what the server must reproduce."""
    cache = {}

    def run(model_id: str, text: str, max_tokens: int = 10, raw: bool = False) -> dict:
        if model_id not in cache:
            model, tok = models.load_model(str(tiny_model_dir), device="cpu")
            if model_id != "tiny":
                model = adapters.load_adapter(model, adapter_dirs[model_id])
            cache[model_id] = (model, tok)
        model, tok = cache[model_id]
        prompt = build_prompt(tok, text, raw=raw)
        return generate(model, tok, [prompt], GenerationSettings(max_new_tokens=max_tokens))[0]

    return run


def test_models_lists_the_base_and_each_adapter(client):
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny", "a", "b", "c"]
    assert all(m.object == "model" for m in listed)
    assert client.models.retrieve("b").id == "b"


@pytest.mark.parametrize("model_id", ["tiny", "a", "b"])
def test_chat_equals_tunelab_generate(client, reference, model_id):
    got = chat(client, model_id, PROMPT, max_tokens=10)
    want = reference(model_id, PROMPT, 10)
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want["text"]
    assert choice.finish_reason == want["finish_reason"]
    assert got.usage.prompt_tokens == want["prompt_tokens"]
    assert got.usage.completion_tokens == want["completion_tokens"]
    assert got.usage.total_tokens == want["prompt_tokens"] + want["completion_tokens"]
    assert got.model == model_id and got.object == "chat.completion"


def test_two_adapters_answer_the_same_prompt_differently(client):
    answers = {m: chat(client, m, PROMPT, max_tokens=12).choices[0].message.content
               for m in ("tiny", "a", "b")}
    assert answers["a"] != answers["b"]
    assert answers["a"] != answers["tiny"] and answers["b"] != answers["tiny"]


def test_completions_use_the_raw_prompt(client, reference):
    got = client.completions.create(model="a", prompt="The capital of", temperature=0,
                                    max_tokens=8)
    want = reference("a", "The capital of", 8, raw=True)
    assert got.object == "text_completion"
    assert got.choices[0].text == want["text"]
    assert got.usage.prompt_tokens == want["prompt_tokens"]
    several = client.completions.create(model="b", prompt=["The capital of", "A quick"],
                                        temperature=0, max_tokens=6)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == reference("b", "The capital of", 6, raw=True)["text"]
    assert several.choices[1].text == reference("b", "A quick", 6, raw=True)["text"]


def test_streaming_chat_equals_the_non_streamed_answer(client):
    whole = chat(client, "c", PROMPT, max_tokens=12)
    stream = chat(client, "c", PROMPT, max_tokens=12, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_streaming_completions(client):
    whole = client.completions.create(model="b", prompt="The capital of", temperature=0,
                                      max_tokens=8)
    parts = list(client.completions.create(model="b", prompt="The capital of", temperature=0,
                                           max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_cut_the_answer_streamed_or_not(client):
    full = chat(client, "a", PROMPT, max_tokens=12).choices[0].message.content
    stop = full[4:6]
    assert stop and full.find(stop) >= 1
    cut = full[: full.find(stop)]
    got = chat(client, "a", PROMPT, max_tokens=12, stop=[stop, "never-appears"])
    assert got.choices[0].message.content == cut
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       chat(client, "a", PROMPT, max_tokens=12, stop=stop, stream=True)
                       if c.choices)
    assert streamed == cut


def test_max_tokens_ends_with_length(client):
    got = chat(client, "tiny", "hello", max_tokens=3)
    if got.choices[0].finish_reason == "length":
        assert got.usage.completion_tokens == 3
    else:  # the model happened to end its turn first
        assert got.usage.completion_tokens < 3


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return chat(client, "b", PROMPT, temperature=1.0, top_p=0.9, seed=seed,
                    max_tokens=12).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def _error(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_unknown_model_is_a_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, "nope", PROMPT)
    err = _error(exc)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "tiny, a, b, c" in err["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 65}, "max_tokens"),  # the server's limit is 64
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_parameters_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "a", PROMPT, **kwargs)
    assert _error(exc)["param"] == param


def test_bad_json_oversized_bodies_and_bad_messages(server):
    url = f"{server}/v1/chat/completions"
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    big = httpx.post(url, json={"model": "a", "messages": [{"role": "user",
                                                             "content": "x" * 70_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunked():  # no content-length: the limit is enforced while reading
        for _ in range(70):
            yield b" " * 1024

    streamed = httpx.post(url, content=chunked())
    assert streamed.status_code == 413
    role = httpx.post(url, json={"model": "a", "messages": [{"role": "robot", "content": "x"}]})
    assert role.status_code == 400 and role.json()["error"]["param"] == "messages[0].role"
    empty = httpx.post(url, json={"model": "a", "messages": []})
    assert empty.status_code == 400
    nan = httpx.post(url, content=b'{"model": "a", "messages": [{"role": "user", "content": '
                                  b'"x"}], "temperature": NaN}')
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"
    deep = httpx.post(url, content=b"[" * 60_000)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(f"{server}/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_context_length_is_enforced(client, engine):
    long = "hello world " * 200  # the tiny model's context is 512 tokens
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "a", long, max_tokens=8)
    assert _error(exc)["code"] == "context_length_exceeded"


def test_api_key(engine):
    from openai import OpenAI

    from tests.serve.conftest import live_server
    from tunelab.serve.app import create_app

    with live_server(create_app(engine, api_key="s3cret")) as url:
        for key in ("wrong", "s3cre", "s3cret-and-more"):
            anonymous = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as exc:
                anonymous.models.list()
            assert _error(exc)["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/chat/completions", json={}).status_code == 401
        authed = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert len(authed.models.list().data) == 4
        assert chat(authed, "a", PROMPT).choices[0].message.content is not None
        assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key
