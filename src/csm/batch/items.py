"""Input lines → work items: JSONL (``id``, ``text``, optional ``speaker``, ``voice``, ``seed``,
``temperature``, ``topk``) or plain text (one utterance a line). A bad line becomes an
:class:`Item` carrying its error, so it is recorded in the manifest and does not stop the job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FIELDS = {"id", "text", "speaker", "voice", "seed", "temperature", "topk"}


@dataclass(frozen=True)
class Item:
    """One utterance to synthesize (``error`` set: the line could not be read)."""

    id: str
    text: str = ""
    speaker: int = 0
    voice: str | None = None
    seed: int | None = None
    temperature: float = 0.9
    topk: int = 50
    error: str | None = None


def read_items(path: Path, *, base_seed: int = 0, temperature: float = 0.9, topk: int = 50) -> list[Item]:
    """Read every non-blank line; a line without a seed gets ``base_seed + line number``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    jsonl = Path(path).suffix == ".jsonl" or any(line.lstrip().startswith("{") for line in lines[:1])
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        defaults = dict(seed=base_seed + number, temperature=temperature, topk=topk)
        item = _parse_json(line, number, defaults) if jsonl else Item(f"{number:06d}", line.strip(), **defaults)
        if item.id in seen:
            item = Item(f"line-{number}", error=f"line {number}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


def _parse_json(line: str, number: int, defaults: dict) -> Item:
    fallback = f"line-{number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        return Item(fallback, error=f"line {number}: not valid JSON ({err.msg})")
    if not isinstance(entry, dict):
        return Item(fallback, error=f"line {number}: expected a JSON object")
    item_id = str(entry.get("id", f"{number:06d}"))
    if not _ID.match(item_id):
        return Item(fallback, error=f"line {number}: id {item_id!r} must be letters, digits, '.', '_' or '-'")
    unknown = set(entry) - _FIELDS
    text = entry.get("text")
    problem = None
    if unknown:
        problem = f"unknown fields {sorted(unknown)}"
    elif not isinstance(text, str) or not text.strip():
        problem = "'text' must be a non-empty string"
    elif not _is_int(entry.get("speaker", 0)) or entry.get("speaker", 0) < 0:
        problem = "'speaker' must be an integer >= 0"
    elif "seed" in entry and not _is_int(entry["seed"]):
        problem = "'seed' must be an integer"
    elif "topk" in entry and not _is_int(entry["topk"]):
        problem = "'topk' must be an integer"
    elif "temperature" in entry and not isinstance(entry["temperature"], (int, float)):
        problem = "'temperature' must be a number"
    elif entry.get("voice") is not None and not isinstance(entry["voice"], str):
        problem = "'voice' must be a string"
    if problem:
        return Item(item_id, error=f"line {number}: {problem}")
    options = {**defaults, **{k: entry[k] for k in ("seed", "temperature", "topk") if k in entry}}
    return Item(item_id, text, int(entry.get("speaker", 0)), entry.get("voice"), **options)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
