"""Property tests: whatever the input, the data loader works or raises tunelab's own error."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab import data
from tunelab.errors import TunelabError

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
roles = st.sampled_from(["system", "user", "assistant", "robot", "", "USER"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(
    st.text(max_size=30), json_scalars)}), max_size=4)
records = st.one_of(
    st.dictionaries(st.sampled_from(["text", "prompt", "completion", "instruction", "input",
                                     "output", "messages", "other"]), json_values, max_size=4),
    st.builds(lambda m: {"messages": m}, messages),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, st.text(max_size=30),
              st.text(max_size=30)),
)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(rows=st.lists(records, min_size=0, max_size=4))
def test_jsonl_records_work_or_raise_tunelab_errors(tmp_path_factory, tiny_tokenizer, rows):
    path = tmp_path_factory.mktemp("prop") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        examples, stats = data.encode_records(data.read_records(path), tiny_tokenizer,
                                              max_length=64)
    except TunelabError as exc:
        assert str(exc)  # a message for the user, never an empty one
        return
    assert all(len(e.input_ids) == len(e.labels) <= 64 and e.n_targets > 0 for e in examples)
    assert stats.n_records == len(rows)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_reader(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("bytes")
    for suffix in (".jsonl", ".json", ".csv"):
        path = folder / f"d{suffix}"
        path.write_bytes(raw)
        try:
            data.read_records(path)
        except TunelabError:
            pass


@SETTINGS
@given(conversation=messages)
def test_chat_formatting_labels_only_assistant_text(tiny_tokenizer, conversation):
    record = data.Record({"messages": conversation}, "mem", 1)
    try:
        example = data.encode_record(record, "chat", tiny_tokenizer)
    except TunelabError:
        return
    targets = tiny_tokenizer.decode([t for t in example.labels if t != data.IGNORE_INDEX])
    expected = "".join(m["content"] + "<|im_end|>" for m in conversation
                       if m["role"] == "assistant")
    assert targets == expected
