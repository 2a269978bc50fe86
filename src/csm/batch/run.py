"""Run batch items on the engine and record them: audio files written atomically, a resumable manifest.

The manifest (``manifest.jsonl`` in the output folder) gets one line per finished item as it
finishes — ``id``, ``path``, ``duration``, ``seed``, ``status`` (``ok`` / ``error``), ``error`` —
and is rewritten in input order, one line per id, when the job ends. A rerun skips the items
whose manifest status is ``ok`` and whose file exists; failed items are tried again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import write_audio
from ..config import SAMPLE_RATE
from .items import Item

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


@dataclass
class Outcome:
    """What became of one item: its audio, or the error that stopped it."""

    item: Item
    audio: np.ndarray | None = None
    error: str | None = None


def synthesize(
    generator, engine, items: list[Item], voices: dict[str, str] | None = None, max_audio_ms: float | None = None
) -> Iterator[Outcome]:
    """Run ``items`` on ``engine`` (at most two batches in flight) and yield outcomes as they finish.

    Args:
        generator: the engine's generator (voices are Mimi-encoded with it, before any job runs).
        voices: ``name -> path`` of saved voices; an item's ``voice`` is looked up here, else read
            as a voice path or named voice (:func:`csm.generation.voices.load_voice`).
        max_audio_ms: length cap of every item (default: derived from its text).
    """
    from ..generation.engine import Request

    contexts = _voice_contexts(generator, items, voices or {})
    pending = [item for item in items]
    running: list = []
    window = 2 * engine.slots
    while pending or running:
        while pending and len(running) < window:
            item = pending.pop(0)
            if item.error is not None:
                yield Outcome(item, error=item.error)
                continue
            context = contexts.get((item.voice, item.speaker), ()) if item.voice else ()
            if isinstance(context, str):  # the voice failed to load
                yield Outcome(item, error=context)
                continue
            try:
                request = Request(item.text, speaker=item.speaker, context=context, temperature=item.temperature,
                                  topk=item.topk, seed=item.seed, max_audio_length_ms=max_audio_ms)
                running.append((item, engine.submit(request)))
            except ValueError as err:
                yield Outcome(item, error=str(err))
        if not running:
            continue
        item, job = running.pop(0)
        try:
            yield Outcome(item, audio=job.result().audio)
        except Exception as err:  # noqa: BLE001 - recorded in the manifest
            yield Outcome(item, error=str(err))


def _voice_contexts(generator, items: list[Item], voices: dict[str, str]) -> dict:
    """``(voice, speaker) -> prepared segments`` (or an error message) for every voice the items use."""
    from ..generation.voices import load_voice

    contexts: dict = {}
    for key in sorted({(i.voice, i.speaker) for i in items if i.voice and i.error is None}):
        name, speaker = key
        try:
            segments = load_voice(voices.get(name, name), speaker, weights_dir=generator.weights_dir)
            contexts[key] = tuple(generator.prepare_context(segments))
        except Exception as err:  # noqa: BLE001
            contexts[key] = f"voice {name!r}: {err}"
    return contexts


class Manifest:
    """The job's record in ``out_dir/manifest.jsonl`` (append as items finish, rewrite at the end)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / MANIFEST
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["id"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by an interruption
        self._file = None

    def done(self, item: Item) -> bool:
        entry = self.entries.get(item.id)
        return bool(entry and entry["status"] == "ok" and (self.path.parent / entry["path"]).is_file())

    def record(self, entry: dict) -> None:
        self.entries[entry["id"]] = entry
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self, order: Iterable[str]) -> None:
        """Rewrite the manifest atomically: input order, one line per id."""
        if self._file is not None:
            self._file.close()
            self._file = None
        lines = [json.dumps(self.entries[i]) + "\n" for i in order if i in self.entries]
        handle, name = tempfile.mkstemp(prefix=".manifest.", suffix=".part", dir=self.path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.writelines(lines)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)
        os.replace(name, self.path)


def run_job(
    items: list[Item],
    out_dir: Path,
    outcomes: Callable[[list[Item]], Iterable[Outcome]],
    *,
    audio_format: str = "wav",
    progress: Callable[[int], object] | None = None,
) -> tuple[int, int]:
    """Synthesize the items not done yet; returns ``(ok, failed)`` counts of this run.

    Args:
        outcomes: runs a list of items (locally or on Ray) and yields their outcomes in any order.
        progress: a tqdm-like factory ``progress(total)`` with ``update()`` and ``close()``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    todo = [item for item in items if not manifest.done(item)]
    if len(todo) < len(items):
        logger.info("resuming: %d of %d items already done", len(items) - len(todo), len(items))
    bar = progress(len(todo)) if progress else None
    ok = failed = 0
    try:
        for outcome in outcomes(todo):
            manifest.record(_record(outcome, out_dir, audio_format))
            ok, failed = (ok + 1, failed) if outcome.error is None else (ok, failed + 1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        manifest.finish(item.id for item in items)
    return ok, failed


def _record(outcome: Outcome, out_dir: Path, audio_format: str) -> dict:
    item = outcome.item
    entry = {"id": item.id, "path": None, "duration": None, "seed": item.seed, "status": "error",
             "error": outcome.error}
    if outcome.error is None:
        name = f"{item.id}.{audio_format}"
        try:
            write_audio(out_dir / name, outcome.audio, SAMPLE_RATE, audio_format)
            entry.update(path=name, duration=round(len(outcome.audio) / SAMPLE_RATE, 4), status="ok")
        except Exception as err:  # noqa: BLE001
            entry["error"] = f"cannot write {name}: {err}"
    if entry["status"] == "error":
        logger.warning("item %s failed: %s", item.id, entry["error"])
    return entry
