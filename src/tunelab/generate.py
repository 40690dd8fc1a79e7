"""Generation with the same chat rendering as training.

A prompt is wrapped as a user turn and rendered with the tokenizer's chat template plus the
generation prompt -- exactly the prefix ``tunelab.data`` uses before each assistant reply in
training -- so a fine-tuned model sees at inference what it saw in training. Generation stops
at the end-of-turn token (the tokenizer's eos, see ``tunelab.models.fix_special_tokens``)
or at any user stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data import render_prompt


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def build_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], *, raw: bool = False,
                 system: str | None = None) -> str:
    if raw:
        assert isinstance(prompt, str)
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(m["content"] for m in messages) + "\n\n"
    return render_prompt(tokenizer, messages)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def decode_rows(tokenizer: Any, out: torch.Tensor, width: int, prompt_mask: torch.Tensor,
                stops: tuple[str, ...]) -> list[dict[str, Any]]:
    """``generate`` output ids (prompts ``width`` wide, left-padded) -> per row ``text``
    (cut at eos or the first stop string), ``finish_reason`` and token counts."""
    results = []
    for row in range(out.shape[0]):
        new = out[row, width:].tolist()
        finish = "length"
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
            finish = "stop"
        while new and new[-1] == tokenizer.pad_token_id:
            new.pop()
        text, stopped = _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stops)
        results.append({"text": text, "finish_reason": "stop" if stopped else finish,
                        "prompt_tokens": int(prompt_mask[row].sum()),
                        "completion_tokens": len(new)})
    return results


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str],
             settings: GenerationSettings) -> list[dict[str, Any]]:
    """Batched generation from already-rendered prompt texts (left-padded).

    Returns per prompt: ``text``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``
    (``stop`` at eos or a stop string, ``length`` at ``max_new_tokens``).
    """
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every row's last prompt token sits at the same column
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens,
                              "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.eos_token_id}
    if settings.temperature > 0:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if settings.stop:
        kwargs["stop_strings"] = list(settings.stop)
        kwargs["tokenizer"] = tokenizer
    was_training = model.training
    model.eval()
    out = model.generate(**enc, **kwargs)
    model.train(was_training)
    return decode_rows(tokenizer, out, enc["input_ids"].shape[1], enc["attention_mask"],
                       tuple(settings.stop))
