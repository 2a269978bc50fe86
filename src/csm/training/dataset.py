"""Find training utterances: a folder of audio + transcripts, or a JSONL manifest.

* Folder: ``name.wav`` (or ``.flac``) with its transcript in ``name.txt``. The speaker id comes
  from ``name.speaker`` (one integer), else ``speakers.json`` (``{"name": id}``), else the
  ``speaker`` argument (``--speaker``). Files are taken in name order, as one conversation when
  ``conversation=True`` (each clip then has the clips before it as context).
* Manifest: one JSON object per line, ``{"audio": path, "text": str, "speaker": int}``, with
  optional ``"conversation"`` (utterances sharing it form a conversation, in file order) and
  ``"sample_rate"`` (checked against the file). Paths are relative to the manifest.

Bad entries never stop the scan: each becomes a :class:`Problem` (reported, then skipped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

AUDIO_SUFFIXES = (".wav", ".flac")
#: Audio recorded below this rate lacks most of what Mimi encodes at 24 kHz.
MIN_SAMPLE_RATE = 16_000


@dataclass
class Utterance:
    """One clip and its transcript; ``conversation`` groups clips spoken in order."""

    audio: Path
    text: str
    speaker: int
    name: str
    conversation: str | None = None


@dataclass
class Problem:
    """A sample that was skipped, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def scan(source: str | Path, *, speaker: int | None = None, conversation: bool = False,
         min_sample_rate: int = MIN_SAMPLE_RATE) -> tuple[list[Utterance], list[Problem]]:
    """Utterances of a folder or a ``.jsonl`` manifest, and the problems found.

    Raises:
        ValueError: ``source`` is neither (one error: nothing to train on is not per-sample).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        found, problems = _scan_folder(path, speaker, conversation)
    elif path.is_file() and path.suffix == ".jsonl":
        found, problems = _scan_manifest(path, speaker)
    else:
        raise ValueError(f"training data must be a folder of .wav + .txt or a .jsonl manifest, got {source}")
    good = []
    for utt, declared in found:
        reason = check_utterance(utt, declared, min_sample_rate)
        if reason:
            problems.append(Problem(utt.name, reason))
        else:
            good.append(utt)
    return good, problems


def check_utterance(utt: Utterance, declared_rate: int | None, min_sample_rate: int) -> str | None:
    """Why ``utt`` cannot be used (unreadable/empty audio, bad rate, empty text), or None."""
    if not utt.text.strip():
        return "empty transcript"
    try:
        info = sf.info(str(utt.audio))
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError
        return f"unreadable audio {utt.audio}: {err}"
    if info.frames == 0:
        return f"empty audio {utt.audio}"
    if declared_rate is not None and declared_rate != info.samplerate:
        return f"sample rate {info.samplerate} Hz, but the manifest says {declared_rate} Hz"
    if info.samplerate < min_sample_rate:
        return f"sample rate {info.samplerate} Hz is below the minimum {min_sample_rate} Hz"
    return None


def _scan_folder(folder: Path, speaker: int | None, conversation: bool):
    clips = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    speakers, problems = _speaker_table(folder, {c.stem for c in clips})
    found = []
    for clip in clips:
        transcript = clip.with_suffix(".txt")
        if not transcript.is_file():
            problems.append(Problem(clip.name, f"no transcript {transcript.name}"))
            continue
        who = _clip_speaker(clip, speakers, speaker)
        if isinstance(who, str):
            problems.append(Problem(clip.name, who))
            continue
        text = transcript.read_text(errors="replace").strip()
        found.append((Utterance(clip, text, who, clip.name, folder.name if conversation else None), None))
    return found, problems


def _speaker_table(folder: Path, stems: set[str]) -> tuple[dict[str, object], list[Problem]]:
    """``speakers.json`` as {stem: id}; names it lists that match no clip are problems."""
    table_file = folder / "speakers.json"
    if not table_file.is_file():
        return {}, []
    try:
        table = json.loads(table_file.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return {}, [Problem(table_file.name, f"ignored ({err})")]
    table = {Path(k).stem: v for k, v in table.items()}
    stray = sorted(set(table) - stems)
    problems = [Problem(table_file.name, f"lists {name!r}, which has no audio file") for name in stray]
    return table, problems


def _clip_speaker(clip: Path, table: dict[str, object], default: int | None) -> int | str:
    """The clip's speaker id, or the reason there is none."""
    own = clip.with_suffix(".speaker")
    if own.is_file():
        value, where = own.read_text().strip(), own.name
    elif clip.stem in table:
        value, where = table[clip.stem], "speakers.json"
    elif default is not None:
        return default
    else:
        return "no speaker: add name.speaker, speakers.json or pass --speaker"
    try:
        return _speaker_id(value)
    except ValueError:
        return f"speaker {value!r} in {where} is not a non-negative integer"


def _speaker_id(value: object) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError(value)
    return int(str(value).strip())


def _scan_manifest(manifest: Path, speaker: int | None):
    found, problems = [], []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name = f"{manifest.name}:{number}"
        try:
            entry = json.loads(line)
            audio, text = manifest.parent / entry["audio"], str(entry["text"])
            who = _speaker_id(entry["speaker"]) if "speaker" in entry else speaker
            if who is None:
                raise ValueError("no 'speaker' and no --speaker")
            rate = int(entry["sample_rate"]) if "sample_rate" in entry else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            problems.append(Problem(name, f"bad manifest line ({type(err).__name__}: {err})"))
            continue
        group = entry.get("conversation")
        found.append((Utterance(audio, text, who, name, None if group is None else str(group)), rate))
    return found, problems
