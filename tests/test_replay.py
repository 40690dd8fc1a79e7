"""Replay (tunelab.replay): the shipped prompts, the base model's cached answers, replay rows
at replay_ratio of each epoch through the mixture, config errors, and the replay_kl term
against a direct computation."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_jsonl
from tunelab import data, replay
from tunelab.cli import main
from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.train import train

# ------------------------------------------------------------------------ the prompt set


STOP = {"a", "an", "the", "is", "are", "of", "in", "on", "to", "for", "what", "which", "who",
        "how", "many", "does", "do", "did", "word", "answer", "give", "one", "two", "sentences",
        "few", "words", "at", "and", "our", "there"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_shipped_prompts_cover_the_skills_and_avoid_the_task_and_the_probe():
    from tunelab.evaluate.probe import load_probe

    rows = [json.loads(x) for x in (replay.resources.files("tunelab") / "assets"
                                    / replay.PROMPTS_ASSET).read_text().splitlines()]
    assert 150 <= len(rows) <= 300
    assert len({r["prompt"] for r in rows}) == len(rows)
    skills = {r["skill"] for r in rows}
    assert skills == {"facts", "language", "arithmetic", "reasoning", "code"}
    # interleaved: the first 10 (replay_prompts: 10) hold every skill
    assert {r["skill"] for r in rows[:10]} == skills
    for r in rows:  # nothing about the quickstart's country records
        assert not _words(r["prompt"]) & {"country", "countries", "capital", "currency",
                                          "population", "inhabitants"}, r["id"]
        for question in (it.question for it in load_probe()):  # and no probe item, nor a
            # near copy of one (scripts/build_probe.py applies this rule when it builds):
            # "What is 7 times 8? Give the number." holds every content word of the probe's
            # question and little else; "the past tense of swim" is the same skill, another item
            q, p = _words(question) - STOP, _words(r["prompt"]) - STOP
            assert not (q <= p and len(q) / len(p) >= 0.5), (r["id"], question)
    assert replay.load_prompts(7) == [r["prompt"] for r in rows[:7]]


def test_an_answer_cut_at_the_token_limit_is_trimmed_to_its_last_sentence():
    assert replay.clean_answer(" Water boils. It then turns int", "length") == "Water boils."
    assert replay.clean_answer("No sentence end here", "length") == "No sentence end here"
    assert replay.clean_answer(" Done. ", "stop") == "Done."


# ------------------------------------------------------------------------------ the cache


def test_the_cache_key_follows_the_model_and_the_prompts(tiny_model_dir, other_tiny_model_dir,
                                                         tiny_tokenizer):
    cfg = build_config({"model": str(tiny_model_dir), "data": "x.jsonl"})
    other = build_config({"model": str(other_tiny_model_dir), "data": "x.jsonl"})
    four = build_config({"model": str(tiny_model_dir), "data": "x.jsonl", "base_bits": 4})
    prompts = replay.load_prompts(5)
    ident = replay.model_identity(cfg, tiny_tokenizer)
    key = replay.cache_key(ident, prompts)
    assert key == replay.cache_key(replay.model_identity(cfg, tiny_tokenizer), prompts)
    assert key != replay.cache_key(replay.model_identity(other, tiny_tokenizer), prompts)
    assert key != replay.cache_key(replay.model_identity(four, tiny_tokenizer), prompts)
    assert key != replay.cache_key(ident, replay.load_prompts(6))
    assert key != replay.cache_key(ident, [*prompts[:4], prompts[4] + "?"])
    # rewritten weights (same folder): a new key
    weights = tiny_model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert key != replay.cache_key(replay.model_identity(cfg, tiny_tokenizer), prompts)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def task_file(tmp_path):
    return write_jsonl(tmp_path / "task.jsonl", [
        {"prompt": f"question {i}: capital of France?", "completion": "Paris"}
        for i in range(40)])


def _cfg(tiny_model_dir, task, out, **kw):
    values = {"model": str(tiny_model_dir), "data": str(task), "out": str(out),
              "device": "cpu", "lr": 1e-2, "batch_size": 4, "max_steps": 2, "lora_r": 4,
              "val_fraction": 0.25, "schedule": "constant"}
    values.update(kw)
    return build_config(values)


def _sources(out):
    return json.loads((out / "summary.json").read_text())["sources"]


def test_self_replay_generates_once_and_the_second_run_reads_the_cache(
        tiny_model_dir, task_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    import tunelab.generate

    calls = []
    real = tunelab.generate.generate

    def counting(model, tokenizer, prompts, settings):
        calls.append(len(prompts))
        assert settings.temperature == 0 and settings.max_new_tokens == replay.MAX_NEW_TOKENS
        assert not any(m.disable_adapters is False for m in _lora_layers(model))  # base only
        return real(model, tokenizer, prompts, settings)

    monkeypatch.setattr(tunelab.generate, "generate", counting)
    monkeypatch.setattr(replay, "BATCH_SIZE", 8)
    monkeypatch.setattr(replay, "MAX_NEW_TOKENS", 24)  # short answers keep the test short
    kw = {"replay": "self", "replay_prompts": 12}
    train(_cfg(tiny_model_dir, task_file, tmp_path / "a", **kw), progress=False)
    assert calls == [8, 4]  # 12 prompts in left-padded batches of 8
    cached = list((tmp_path / "cache" / "replay").glob("*.jsonl"))
    assert len(cached) == 1
    rows = [json.loads(x) for x in cached[0].read_text().splitlines()]
    assert 0 < len(rows) <= 12
    assert rows[0]["messages"][0] == {"role": "user", "content": replay.load_prompts(1)[0]}
    stamp = cached[0].stat().st_mtime_ns

    train(_cfg(tiny_model_dir, task_file, tmp_path / "b", **kw), progress=False)
    assert calls == [8, 4]  # nothing generated the second time
    assert cached[0].stat().st_mtime_ns == stamp
    for out in (tmp_path / "a", tmp_path / "b"):
        names = [(s["name"], s.get("replay", False), s["path"]) for s in _sources(out)]
        assert names == [("task", False, str(task_file)), ("replay", True, str(cached[0]))]
    # a cache miss and a hit train the same (generation draws no random numbers)
    losses = [[json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text()
               .splitlines()] for out in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == losses[1]
    # fewer prompts: another cache file, not yet written
    from tunelab.models import load_tokenizer

    other = replay.plan(_cfg(tiny_model_dir, task_file, tmp_path / "c", replay="self",
                             replay_prompts=3), load_tokenizer(str(tiny_model_dir)))
    assert other.pending and other.path != str(cached[0]) and len(other.prompts) == 3


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_replay_file_rows_are_replay_ratio_of_each_epoch(tiny_model_dir, task_file, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"text": f"A quick brown fox {i} jumps over the lazy dog."} for i in range(16)])
    out = tmp_path / "run"
    # task: 30 train rows; an epoch of round(30 / 0.75) = 40 rows, 10 of them replay; 10
    # micro-batches of 4 are exactly one epoch
    train(_cfg(tiny_model_dir, task_file, out, replay=str(general), replay_ratio=0.25,
               max_steps=10, eval_every=10), progress=False)
    sources = _sources(out)
    assert [s["name"] for s in sources] == ["task", "replay"]
    assert [s["train_examples"] for s in sources] == [30, 12]  # 16 rows, a quarter held out
    assert [s["rows_per_epoch"] for s in sources] == [30, 10]
    assert [s["rows"] for s in sources] == [30, 10]
    assert sources[1]["share"] == pytest.approx(0.25)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val_loss/task", "val_loss/replay"} <= set(last)
    # every micro-batch of the epoch marks exactly its replay rows
    from tunelab.data.mixture import load_mixture
    from tunelab.models import load_tokenizer

    cfg = _cfg(tiny_model_dir, task_file, out, replay=str(general), replay_ratio=0.25)
    mix = load_mixture(cfg, load_tokenizer(str(tiny_model_dir)))
    mix.add_replay(str(general), cfg, load_tokenizer(str(tiny_model_dir)))
    schedule = mix.schedule(4, cfg.seed)
    flagged = sum(mix.train_set[i].replay for k in range(10) for i in schedule.indices(k))
    assert schedule.n == 40 and flagged == 10


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("extra,message", [
    ({"replay": "nowhere.jsonl"}, "replay: file not found: nowhere.jsonl; give replay: self"),
    ({"replay": "self", "replay_ratio": 1.0}, "'replay_ratio' is 1.0; it must be >= 0 and < 1"),
    ({"replay": "self", "replay_ratio": -0.1}, "'replay_ratio' is -0.1; it must be >= 0"),
    ({"replay": "self", "replay_ratio": "lots"}, "'replay_ratio' must be a number"),
    ({"replay_ratio": 1.5}, "'replay_ratio' is 1.5; it must be >= 0 and < 1"),
    ({"replay_prompts": 5}, "replay_prompts applies with replay; add replay: self"),
    ({"replay_kl": 0.1}, "replay_kl applies with replay"),
    ({"replay": "self", "replay_kl": -1}, "'replay_kl' is -1.0; it must be >= 0"),
    ({"replay": "self", "replay_kl": 0.1, "method": "full"}, "replay_kl needs method: lora"),
    ({"replay": "self", "objective": "dpo"}, "replay mixes general rows into SFT data"),
])
def test_bad_replay_settings_are_one_clear_error_line(task_file, tmp_path, capsys, extra,
                                                      message):
    values = {"data": str(task_file), **extra}
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(values)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(values))  # JSON is YAML
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_replay_prompts_belong_to_replay_self(task_file):
    with pytest.raises(ConfigError, match="replay_prompts caps the prompts of replay: self"):
        build_config({"data": str(task_file), "replay": str(task_file), "replay_prompts": 5})
    cfg = build_config({"data": str(task_file), "replay": "self"})
    assert cfg.replay_ratio == 0.2  # the default once replay is set
    # a ratio alone is the base's own answers (a sweep's replay_ratio=0,0.2 on any config);
    # 0 without replay is no replay
    cfg = build_config({"data": str(task_file), "replay_ratio": 0.3})
    assert (cfg.replay, cfg.replay_ratio) == ("self", 0.3)
    cfg = build_config({"data": str(task_file), "replay_ratio": 0})
    assert (cfg.replay, cfg.replay_ratio) == ("", 0.0)


# ------------------------------------------------------------------------- the KL term


def _lora_model(tiny_model_dir, perturb: bool):
    from tunelab import adapters, models

    torch.manual_seed(0)
    model, tok = models.load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    model = adapters.attach_lora(model, r=4, alpha=8, dropout=0.0,
                                 target_modules="all-linear")
    if perturb:  # a trained-looking adapter: B != 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model, tok


def _examples(tok):
    rows = [{"prompt": "question one?", "completion": "answer one, the long one"},
            {"prompt": "what now", "completion": "Paris is"},
            {"prompt": "a quick brown fox", "completion": "jumps over the lazy dog"}]
    records = [data.Record(r, "mem", i + 1) for i, r in enumerate(rows)]
    examples = data.encode_records(records, tok, fmt="prompt_completion")[0]
    examples[0].replay = examples[2].replay = True
    return examples


def _direct_kl(model, batch) -> torch.Tensor:
    """Two forward passes by hand: KL(p_base || p_model) summed over replay target tokens."""
    from tunelab.packing import HOST_KEYS

    kwargs = {k: v for k, v in batch.items()
              if k not in ("labels", data.REPLAY_KEY, *HOST_KEYS)}
    with torch.no_grad():
        logits = model(**kwargs).logits.double()
        with model.disable_adapter():
            base = model(**kwargs).logits.double()
    pick = (batch["labels"][:, 1:] != data.IGNORE_INDEX) & batch[data.REPLAY_KEY][:, 1:]
    log_p, log_b = logits[:, :-1][pick].log_softmax(-1), base[:, :-1][pick].log_softmax(-1)
    explicit = (log_b.exp() * (log_b - log_p)).sum()
    torch.testing.assert_close(explicit, F.kl_div(log_p, log_b, log_target=True,
                                                  reduction="sum"))
    return explicit


def test_the_kl_term_equals_a_direct_computation(tiny_model_dir):
    from tunelab.objectives.replay_kl import ReplayKLObjective

    model, tok = _lora_model(tiny_model_dir, perturb=True)
    objective = ReplayKLObjective(model, weight=0.5).train()
    pad = tok.pad_token_id
    batch = data.collate(_examples(tok), pad)  # padded, right-aligned rows
    assert batch[data.REPLAY_KEY][:, 0].tolist() == [True, False, True]
    parts, metrics = objective(**batch)
    want = _direct_kl(model, batch)
    assert want > 1e-3  # the adapter moved the distribution
    assert abs(float(parts["replay_targets"]) - 0.5 * float(want)) < 1e-6 * max(1, float(want))
    assert abs(float(metrics["replay_kl"]) - float(want)) < 1e-6 * max(1, float(want))
    counts = objective.counts(batch)
    assert counts["replay_targets"] == int(
        ((batch["labels"][:, 1:] != -100) & batch[data.REPLAY_KEY][:, 1:]).sum()) > 0
    # the cross-entropy part is SFT's, untouched by the term
    from tunelab.objectives import SFTObjective

    sft_parts, _ = SFTObjective(model).train()(**batch)
    torch.testing.assert_close(parts["targets"], sft_parts["targets"])
    # the gradient reaches the adapters through the KL part alone
    model.zero_grad()
    parts["replay_targets"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_" in n)
    # eval mode (validation): cross-entropy only
    objective.eval()
    parts, metrics = objective(**batch)
    assert set(parts) == {"targets"} and metrics == {}


def test_the_kl_term_on_a_packed_row_matches_and_is_zero_at_step_zero(tiny_model_dir):
    from tunelab.objectives.replay_kl import ReplayKLObjective
    from tunelab.packing import collate_packed, use_packed_attention

    model, tok = _lora_model(tiny_model_dir, perturb=False)  # fresh LoRA: B = 0
    use_packed_attention(model)
    objective = ReplayKLObjective(model, weight=1.0).train()
    batch = collate_packed(_examples(tok))
    parts, metrics = objective(**batch)
    assert abs(float(parts["replay_targets"])) < 1e-6  # model == base at step 0
    # with B != 0, the packed row's KL equals the direct one on the padded rows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    parts, _ = objective(**batch)
    want = _direct_kl(model, data.collate(_examples(tok), tok.pad_token_id))
    assert want > 1e-3
    assert abs(float(parts["replay_targets"]) - float(want)) < 1e-5 * float(want)


def test_a_run_with_replay_kl_logs_the_term_and_starts_at_zero(tiny_model_dir, task_file,
                                                              tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"prompt": f"general question {i}?", "completion": "a general answer"}
        for i in range(12)])
    out = tmp_path / "kl"
    train(_cfg(tiny_model_dir, task_file, out, replay=str(general), replay_ratio=0.5,
               replay_kl=1.0, max_steps=4, lr=5e-2), progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("replay_kl" in r for r in lines)
    assert abs(lines[0]["replay_kl"]) < 1e-6  # LoRA's B = 0 before the first update
    assert max(r["replay_kl"] for r in lines[1:]) > 1e-6  # then the adapter moves away
