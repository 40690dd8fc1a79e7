"""Read a model's licence and say, in one line, what it allows.

Sources, first hit wins: the model card's YAML front matter (``license:``, or
``license_name:`` when ``license: other``), ``config.json`` (``license``), a GGUF header
(``general.license``, ``general.license.name``), then a LICENSE file's text.

Categories:

* ``permissive``: Apache-2.0, MIT, BSD-*, CC0/CC-BY: commercial use allowed, keep notices.
* ``conditions``: usable commercially under extra terms (Llama community licences, Gemma terms,
  OpenRAIL use restrictions, Qwen licence, copyleft).
* ``non-commercial``: CC BY-NC-*, research-only licences (LLaMA 1, Qwen Research, Mistral
  non-production/research).
* ``unknown``: nothing found or not recognised: check by hand before shipping anything.

This is a reading aid, not legal advice: the summary names the main condition, the licence
text is what binds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import ModelError

Category = Literal["permissive", "conditions", "non-commercial", "unknown"]


@dataclass(frozen=True)
class LicenceInfo:
    """A classified licence: normalised ``id``, ``category``, one-line ``summary``."""

    id: str
    category: Category
    summary: str
    source: str = ""  # where it was read, e.g. "README.md front matter"

    @property
    def warning(self) -> str | None:
        """A line to print for licences that need a human look, else None."""
        if self.category == "non-commercial":
            return (f"WARNING: licence '{self.id}' does not allow commercial use: {self.summary}")
        if self.category == "unknown":
            return (f"WARNING: licence unknown ({self.summary}); check the model's terms "
                    f"before using or sharing a fine-tune")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "summary": self.summary,
                "source": self.source}


_CC_NC = "Creative Commons NonCommercial: no commercial use; attribution required"
_LLAMA3 = ("commercial use allowed unless your products exceed 700M monthly active users; "
           "show 'Built with Llama', prefix derived model names with 'Llama'; Acceptable Use "
           "Policy applies")
_RAIL = "OpenRAIL: use allowed (incl. commercial) subject to use-based restrictions you must " \
        "pass on to downstream users"

# id -> (category, summary). Ids follow the Hugging Face Hub's licence identifiers.
KNOWN_LICENCES: dict[str, tuple[Category, str]] = {
    "apache-2.0": ("permissive", "Apache 2.0: commercial use allowed; keep the licence and "
                   "NOTICE, state changes"),
    "mit": ("permissive", "MIT: commercial use allowed; keep the copyright notice"),
    "bsd-2-clause": ("permissive", "BSD 2-clause: commercial use allowed; keep the notice"),
    "bsd-3-clause": ("permissive", "BSD 3-clause: commercial use allowed; keep the notice, no "
                     "endorsement"),
    "bsd": ("permissive", "BSD: commercial use allowed; keep the notice"),
    "isc": ("permissive", "ISC: commercial use allowed; keep the notice"),
    "cc0-1.0": ("permissive", "CC0: public-domain dedication, no conditions"),
    "unlicense": ("permissive", "Unlicense: public-domain dedication, no conditions"),
    "cc-by-4.0": ("permissive", "CC BY 4.0: commercial use allowed; attribution required"),
    "llama2": ("conditions", "Llama 2 Community License: commercial use allowed unless your "
               "products exceed 700M monthly active users; Acceptable Use Policy applies"),
    "llama3": ("conditions", f"Meta Llama 3 Community License: {_LLAMA3}"),
    "llama3.1": ("conditions", f"Llama 3.1 Community License: {_LLAMA3}"),
    "llama3.2": ("conditions", f"Llama 3.2 Community License: {_LLAMA3}"),
    "llama3.3": ("conditions", f"Llama 3.3 Community License: {_LLAMA3}"),
    "llama4": ("conditions", f"Llama 4 Community License: {_LLAMA3}"),
    "gemma": ("conditions", "Gemma Terms of Use: commercial use allowed; the Prohibited Use "
              "Policy applies and must be passed on with derivatives"),
    "openrail": ("conditions", _RAIL),
    "openrail++": ("conditions", _RAIL),
    "creativeml-openrail-m": ("conditions", _RAIL),
    "bigscience-openrail-m": ("conditions", _RAIL),
    "bigscience-bloom-rail-1.0": ("conditions", _RAIL),
    "bigcode-openrail-m": ("conditions", _RAIL),
    "deepseek": ("conditions", "DeepSeek License: commercial use allowed with use-based "
                 "restrictions (OpenRAIL-style)"),
    "qwen": ("conditions", "Qwen License: commercial use allowed unless your products exceed "
             "100M monthly active users; attribution required"),
    "cc-by-sa-4.0": ("conditions", "CC BY-SA 4.0: commercial use allowed; share-alike and "
                     "attribution"),
    "gpl-2.0": ("conditions", "GPL 2.0: copyleft; distributed derivatives must be GPL"),
    "gpl-3.0": ("conditions", "GPL 3.0: copyleft; distributed derivatives must be GPL"),
    "lgpl-3.0": ("conditions", "LGPL 3.0: weak copyleft"),
    "agpl-3.0": ("conditions", "AGPL 3.0: copyleft, including use over a network"),
    "cc-by-nc-4.0": ("non-commercial", _CC_NC),
    "cc-by-nc-sa-4.0": ("non-commercial", _CC_NC + "; share-alike"),
    "cc-by-nc-nd-4.0": ("non-commercial", _CC_NC + "; no derivatives may be shared"),
    "cc-by-nc-3.0": ("non-commercial", _CC_NC),
    "cc-by-nc-sa-3.0": ("non-commercial", _CC_NC + "; share-alike"),
    "cc-by-nc-2.0": ("non-commercial", _CC_NC),
    "cc-by-nc": ("non-commercial", _CC_NC),
    "llama1": ("non-commercial", "LLaMA (v1) licence: non-commercial research use only, "
               "weights by request"),
    "qwen-research": ("non-commercial", "Qwen Research License: research and non-commercial "
                      "use only; commercial use needs permission from Alibaba Cloud"),
    "mnpl": ("non-commercial", "Mistral AI Non-Production License: no production or "
             "commercial use"),
    "mrl": ("non-commercial", "Mistral AI Research License: research use only"),
    "research-only": ("non-commercial", "research / non-commercial use only"),
    "proprietary": ("unknown", "proprietary, weights not released (API only); shown for "
                    "sizing comparisons"),
    "other": ("unknown", "licence marked 'other' with no name"),
    "unknown": ("unknown", "no licence found"),
}

# Spellings seen in model cards and GGUF headers -> canonical id.
_ALIASES: dict[str, str] = {
    "apache": "apache-2.0", "apache2": "apache-2.0", "apache-2": "apache-2.0",
    "apache2.0": "apache-2.0", "apache-license-2.0": "apache-2.0",
    "apache-license-version-2.0": "apache-2.0", "mit-license": "mit",
    "bsd-3": "bsd-3-clause", "bsd-2": "bsd-2-clause", "bsd3": "bsd-3-clause",
    "llama-2": "llama2", "llama2-community": "llama2", "llama-2-community-license": "llama2",
    "llama-3": "llama3", "llama-3.1": "llama3.1", "llama-3.2": "llama3.2",
    "llama-3.3": "llama3.3", "llama-4": "llama4", "llama": "llama1", "llama-1": "llama1",
    "gemma-terms-of-use": "gemma", "gemma-terms": "gemma",
    "qwen-license": "qwen", "tongyi-qianwen": "qwen", "qwen-research-license": "qwen-research",
    "cc-by-nc-4": "cc-by-nc-4.0", "cc-by-nc-sa-4": "cc-by-nc-sa-4.0",
    "mistral-non-production-license": "mnpl", "mistral-research-license": "mrl",
    "non-commercial": "research-only", "noncommercial": "research-only",
    "research": "research-only", "gpl-3": "gpl-3.0", "gpl": "gpl-3.0", "agpl": "agpl-3.0",
}

# Phrases found in licence texts, most specific first (a Llama licence mentions "commercial").
_TEXT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"llama 2 community license", "llama2"),
    (r"llama 3\.3 community license", "llama3.3"),
    (r"llama 3\.2 community license", "llama3.2"),
    (r"llama 3\.1 community license", "llama3.1"),
    (r"llama 3 community license", "llama3"),
    (r"llama 4 community license", "llama4"),
    (r"gemma terms of use", "gemma"),
    (r"qwen research license", "qwen-research"),
    (r"(tongyi qianwen|qwen) license agreement", "qwen"),
    (r"non-production license", "mnpl"),
    (r"mistral ai research license", "mrl"),
    (r"attribution-noncommercial-sharealike", "cc-by-nc-sa-4.0"),
    (r"attribution-noncommercial-noderivatives", "cc-by-nc-nd-4.0"),
    (r"attribution-noncommercial", "cc-by-nc-4.0"),
    (r"\bopenrail|responsible ai license", "openrail"),
    (r"non-?commercial (research )?(use|purposes?)|research purposes only|"
     r"for research use only", "research-only"),
    (r"apache license,?\s+version 2\.0|\bapache-2\.0\b", "apache-2.0"),
    (r"permission is hereby granted, free of charge|\bmit license\b", "mit"),
    (r"gnu affero general public license", "agpl-3.0"),
    (r"gnu lesser general public license", "lgpl-3.0"),
    (r"gnu general public license", "gpl-3.0"),
    (r"attribution-sharealike 4\.0", "cc-by-sa-4.0"),
    (r"creative commons attribution 4\.0", "cc-by-4.0"),
)


def _info(licence_id: str, source: str = "") -> LicenceInfo:
    category, summary = KNOWN_LICENCES[licence_id]
    return LicenceInfo(licence_id, category, summary, source)


def _normalise_id(text: str) -> str:
    s = re.sub(r"[\s_]+", "-", text.strip().lower())
    return _ALIASES.get(s, s)


def classify_licence(text_or_id: str | None, *, source: str = "") -> LicenceInfo:
    """Classify a licence id (``apache-2.0``, ``llama2``, ``cc-by-nc-4.0``) or licence text.

    Short strings are matched as ids first (with common spellings); anything else is searched
    for tell-tale phrases ("Llama 2 Community License", "Attribution-NonCommercial", ...).
    """
    if text_or_id is None or not str(text_or_id).strip():
        return _info("unknown", source)
    text = str(text_or_id)
    if "\n" not in text and len(text) <= 80:
        licence_id = _normalise_id(text)
        if licence_id in KNOWN_LICENCES:
            return _info(licence_id, source)
        if licence_id.startswith("bsd"):
            return LicenceInfo(licence_id, "permissive", KNOWN_LICENCES["bsd"][1], source)
    if "\n" in text and text.count("\n") > 2:
        # A licence file: its opening lines carry the name, the body mentions other licences.
        head = "\n".join(text.splitlines()[:15])
        found = _match_text(head) or _match_text(text)
    else:
        found = _match_text(text)
    if found == "bsd":
        found = "bsd-3-clause" if "neither the name" in text.lower() else "bsd-2-clause"
    if found:
        return _info(found, source)
    return LicenceInfo(_normalise_id(text)[:40] if "\n" not in text else "unknown", "unknown",
                       f"unrecognised licence '{text.strip()[:60]}'", source)


def _match_text(text: str) -> str | None:
    low = " ".join(text.lower().split())
    for pattern, licence_id in _TEXT_PATTERNS:
        if re.search(pattern, low):
            return licence_id
    if "redistribution and use in source and binary forms" in low:
        return "bsd"
    return None


# ----------------------------------------------------------------------------- readers
def _front_matter(readme: str) -> dict[str, Any]:
    """The YAML block between leading ``---`` lines of a model card (empty if none)."""
    match = re.match(r"\A\ufeff?---\s*\n(.*?)\n---\s*(\n|\Z)", readme, re.DOTALL)
    if not match:
        return {}
    block = match.group(1)
    try:
        import yaml

        data = yaml.safe_load(block)
        return data if isinstance(data, dict) else {}
    except Exception:
        # No PyYAML or odd YAML: the keys we need are simple "key: value" lines.
        out: dict[str, Any] = {}
        for line in block.splitlines():
            m = re.match(r"^(license(?:_name|_link)?)\s*:\s*(.+?)\s*$", line)
            if m:
                out[m.group(1)] = m.group(2).strip("'\"")
        return out


def _from_card(meta: dict[str, Any], source: str) -> LicenceInfo | None:
    lic = meta.get("license")
    if isinstance(lic, list):
        lic = lic[0] if lic else None
    name = meta.get("license_name")
    if lic and str(lic).lower() != "other":
        return classify_licence(str(lic), source=source)
    if name:
        info = classify_licence(str(name), source=source)
        if info.category != "unknown":
            return info
        return LicenceInfo(str(name), "unknown", f"custom licence '{name}' "
                           f"({meta.get('license_link', 'no link')})", source)
    if lic:
        return _info("other", source)
    return None


_LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt",
                  "LICENCE.md", "LICENSE.TXT")


def _read_folder(folder: Path) -> LicenceInfo:
    readme = folder / "README.md"
    if readme.is_file():
        meta = _front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        info = _from_card(meta, "README.md front matter")
        if info is not None and info.id != "other":
            return info
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        if isinstance(data, dict) and data.get("license"):
            return classify_licence(str(data["license"]), source="config.json")
    for name in _LICENCE_FILES:
        path = folder / name
        if path.is_file():
            info = classify_licence(path.read_text(encoding="utf-8", errors="replace"),
                                    source=name)
            return info
    return LicenceInfo("unknown", "unknown", "no licence in README.md front matter, "
                       "config.json or a LICENSE file", str(folder))


def _read_gguf(path: Path) -> LicenceInfo:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(os.fspath(path), "r")
    except Exception as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc

    def get(key: str) -> str | None:
        fld = reader.fields.get(key)
        return None if fld is None else str(fld.contents())

    for key in ("general.license", "general.license.name"):
        value = get(key)
        if value and value.lower() != "other":
            return classify_licence(value, source=f"GGUF {key}")
    return LicenceInfo("unknown", "unknown", "GGUF header has no general.license", "gguf")


def read_model_licence(path_or_catalog_entry: Any) -> LicenceInfo:
    """The licence of a model folder, a .gguf file, a catalogue :class:`Arch` or name.

    Accepts a ``tunelab.plan.catalog.Arch`` (uses its ``licence`` id), an existing path, or a
    catalogue name / Hub id known to the catalogue.
    """
    licence_id = getattr(path_or_catalog_entry, "licence", None)
    if licence_id is not None and not isinstance(path_or_catalog_entry, (str, os.PathLike)):
        source = getattr(path_or_catalog_entry, "source", "catalogue")
        return classify_licence(str(licence_id), source=source)
    path = Path(os.fspath(path_or_catalog_entry)).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _read_gguf(path)
        if path.name == "config.json" or path.name == "README.md":
            return _read_folder(path.parent)
        return classify_licence(path.read_text(encoding="utf-8", errors="replace"),
                                source=path.name)
    from tunelab.plan.catalog import find_arch

    arch = find_arch(str(path_or_catalog_entry))
    if arch is None:
        raise ModelError(f"'{path_or_catalog_entry}' is not a model folder, a .gguf file or a "
                         f"catalogue name: cannot read its licence")
    return classify_licence(arch.licence, source="catalogue")


def _hub_card_licence(repo_id: str) -> LicenceInfo | None:
    """A Hub model's card from the local Hugging Face cache only (no network)."""
    try:
        from huggingface_hub import hf_hub_download

        readme = Path(hf_hub_download(repo_id, "README.md", local_files_only=True))
    except Exception:
        return None
    info = _from_card(_front_matter(readme.read_text(encoding="utf-8", errors="replace")),
                      "README.md front matter (HF cache)")
    return info if info is not None and info.id != "other" else None


def licence_for_model_source(source: Any) -> LicenceInfo:
    """The licence of what ``tunelab.models.resolve_model`` resolved a ``--model`` to.

    ``source`` is a ``tunelab.models.ModelSource`` (``kind`` gguf / folder / hub, ``path``,
    ``licence_hint``), or a model spec string (alias, .gguf file, folder, Hub id), which is
    resolved first. Order: the alias table's licence; a GGUF header's ``general.license``; a
    folder's model card / config.json / LICENSE file; for a Hub id, its card in the local HF
    cache, then the planner's catalogue. Never raises for a readable source: what cannot be
    determined is ``unknown`` (whose :attr:`LicenceInfo.warning` says to check by hand).
    """
    if source is None:
        return _info("unknown", "no model source")
    if isinstance(source, (str, os.PathLike)):
        from tunelab.models import resolve_model

        source = resolve_model(os.fspath(source))
    spec = str(getattr(source, "spec", "") or getattr(source, "path", ""))
    hint = getattr(source, "licence_hint", None)
    if hint:
        return classify_licence(hint, source=f"tunelab alias {spec}")
    kind, path = getattr(source, "kind", ""), str(getattr(source, "path", ""))
    if kind in ("gguf", "folder"):
        try:
            return read_model_licence(path)
        except ModelError:
            return LicenceInfo("unknown", "unknown", f"cannot read a licence from {path}", spec)
    if kind == "hub":
        info = _hub_card_licence(path)
        if info is not None:
            return info
        from tunelab.plan.catalog import find_arch

        arch = find_arch(path)
        if arch is not None:
            return classify_licence(arch.licence, source="catalogue")
        return LicenceInfo("unknown", "unknown", f"no model card for '{path}' in the local "
                           "Hugging Face cache", spec)
    return _info("unknown", spec)
