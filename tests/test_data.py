from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tunelab import data
from tunelab.errors import DataError


def encode(path, tokenizer, **kw):
    return data.encode_records(data.read_records(path), tokenizer, **kw)


def target_text(tokenizer, ex: data.Example) -> str:
    return tokenizer.decode([t for t in ex.labels if t != data.IGNORE_INDEX])


# ------------------------------------------------------------------ formats and labels


def test_detects_each_format(tmp_path):
    cases = {
        "text": {"text": "hello"},
        "prompt_completion": {"prompt": "a", "completion": "b"},
        "instruction": {"instruction": "a", "input": "x", "output": "b"},
        "chat": {"messages": [{"role": "user", "content": "a"},
                              {"role": "assistant", "content": "b"}]},
    }
    for name, row in cases.items():
        records = data.read_records(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert data.resolve_format(records) == name


def test_completion_only_labels_are_the_answer_and_end_of_turn(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "capital of France?",
                                                "completion": "Paris"}])
    (ex,), stats = encode(path, tiny_tokenizer)
    assert target_text(tiny_tokenizer, ex) == "Paris<|im_end|>"
    # the prompt side is exactly the generation prompt inference uses
    prompt_ids = ex.input_ids[: ex.labels.index(next(t for t in ex.labels if t != -100))]
    rendered = data.render_prompt(tiny_tokenizer, [{"role": "user",
                                                    "content": "capital of France?"}])
    assert tiny_tokenizer.decode(prompt_ids) == rendered
    assert stats.n_target_tokens == ex.n_targets


def test_multi_turn_chat_trains_every_assistant_turn_only(tmp_path, tiny_tokenizer):
    row = {"messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "world"},
                        {"role": "user", "content": "question"},
                        {"role": "assistant", "content": "answer"}]}
    (ex,), _ = encode(write_jsonl(tmp_path / "c.jsonl", [row]), tiny_tokenizer)
    assert target_text(tiny_tokenizer, ex) == "world<|im_end|>answer<|im_end|>"


def test_instruction_input_joined_and_train_on_all(tmp_path, tiny_tokenizer):
    row = {"instruction": "Answer", "input": "capital of France?", "output": "Paris"}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    (ex,), _ = encode(path, tiny_tokenizer)
    assert "Answer\n\ncapital of France?" in tiny_tokenizer.decode(ex.input_ids)
    (ex_all,), _ = encode(path, tiny_tokenizer, train_on="all")
    assert ex_all.labels == ex_all.input_ids


def test_text_format_trains_all_tokens_and_appends_eos(tmp_path, tiny_tokenizer):
    (ex,), _ = encode(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]),
                      tiny_tokenizer)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_reads_json_csv_parquet(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "a b", "completion": "c"}, {"prompt": "d", "completion": "e"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na b,c\nd,e\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        records = data.read_records(tmp_path / name)
        assert [r.data for r in records] == rows, name


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hi"}).encode() + b"\n")
    assert data.read_records(path)[0].data == {"text": "hi"}


def test_overlength_truncate_and_drop_are_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "capital " * 40, "completion": "Paris"},
            {"prompt": "short?", "completion": "yes " * 40}, {"prompt": "a", "completion": "b"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    kept, stats = encode(path, tiny_tokenizer, max_length=24, overlength="drop")
    assert len(kept) == 1 and stats.n_dropped == 2 and stats.n_truncated == 0
    kept, stats = encode(path, tiny_tokenizer, max_length=24, overlength="truncate")
    # the first loses its whole answer to truncation, so it is dropped (and counted)
    assert stats.n_truncated == 2 and stats.n_dropped == 1 and len(kept) == 2
    assert all(len(e.input_ids) <= 24 for e in kept)
    with pytest.raises(DataError, match="line 1.*over max_length 24"):
        encode(path, tiny_tokenizer, max_length=24, overlength="error")


def test_split_is_deterministic_under_seed(tmp_path):
    records = data.read_records(write_jsonl(tmp_path / "s.jsonl",
                                            [{"text": str(i)} for i in range(50)]))
    a = data.split_records(records, 0.2, seed=3)
    b = data.split_records(records, 0.2, seed=3)
    c = data.split_records(records, 0.2, seed=4)
    assert [r.line for r in a[1]] == [r.line for r in b[1]]
    assert len(a[1]) == 10 and len(a[0]) == 40
    assert [r.line for r in a[1]] != [r.line for r in c[1]]


def test_batch_schedule_is_a_function_of_the_step():
    s = data.BatchSchedule(10, 4, seed=1)
    epoch0 = [i for k in range(3) for i in s.indices(k)]
    assert sorted(epoch0) == list(range(10))
    assert s.indices(5) == data.BatchSchedule(10, 4, seed=1).indices(5)


# ----------------------------------------------------------------------- bad input


BAD_CASES = [
    ("malformed.jsonl", '{"text": "ok"}\n{"text": "broken\n', r"malformed\.jsonl, line 2: "
     r"malformed JSON"),
    ("missing.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
     r"line 2, field 'completion'"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: the file holds no examples"),
    ("role.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n",
     r"line 1, field 'messages\[0\]\.role': unknown role 'robot'; allowed: system, user, "
     r"assistant"),
    ("content.jsonl", json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n",
     r"field 'messages\[0\]\.content': content must be a string, got int"),
    ("noassistant.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n",
     r"line 1, field 'messages': conversation has no assistant turn"),
    ("mixed.jsonl", '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n',
     r"line 2: mixed formats in one file"),
    ("emptycontent.jsonl", '{"prompt": "a", "completion": "  "}\n',
     r"line 1, field 'completion': empty content"),
    ("nonstring.jsonl", '{"prompt": "a", "completion": 5}\n',
     r"field 'completion': expected a string, got int"),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n',
     r"line 1: cannot tell the format from the fields \(answer, question\)"),
    ("array.jsonl", '[1, 2]\n', r"line 1: expected a JSON object, got list"),
]


@pytest.mark.parametrize("name,content,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_messages_name_file_line_field(tmp_path, tiny_tokenizer, name, content,
                                                  message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        encode(path, tiny_tokenizer)


def test_wrong_encoding_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2: not valid UTF-8"):
        data.read_records(path)


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        data.read_records(tmp_path / "x.txt")


def test_huge_line_is_refused_with_its_line_number(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "' + "x" * (data.MAX_LINE_BYTES + 1) + '"}\n')
    with pytest.raises(DataError, match=r"huge\.jsonl, line 2: line is 16,777,2\d\d characters"):
        data.read_records(path)
