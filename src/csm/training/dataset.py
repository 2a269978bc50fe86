"""Find training utterances: a folder of audio + transcripts, a JSONL manifest, or a Hugging Face dataset.

* Folder: ``name.wav`` (or ``.flac``) with its transcript in ``name.txt``. The speaker id comes
  from ``name.speaker`` (one integer), else ``speakers.json`` (``{"name": id}``), else the
  ``speaker`` argument (``--speaker``). Files are taken in name order, as one conversation when
  ``conversation=True`` (each clip then has the clips before it as context).
* Manifest: one JSON object per line, ``{"audio": path, "text": str, "speaker": int}``, with
  optional ``"conversation"`` (utterances sharing it form a conversation, in file order) and
  ``"sample_rate"`` (checked against the file). Paths are relative to the manifest.
* Hugging Face ``datasets`` (the ``datasets`` extra): a folder written by ``Dataset.save_to_disk``
  (a ``DatasetDict``'s ``split``), or an ``audiofolder`` (audio files + a top-level
  ``metadata.csv`` / ``metadata.jsonl`` naming them in ``file_name``, seen as the ``audio``
  column). Each row has an audio column (an ``Audio`` feature, read undecoded: the embedded
  file bytes or a path; or ``{"array", "sampling_rate"}``, channels first; or a path string), a
  text column and, optionally, a speaker column (else ``--speaker``); the names are
  :class:`Columns`. Audio is decoded with soundfile and resampled exactly like files (torchcodec,
  which ``datasets`` decodes with, is not needed). Rows stay on disk (memory-mapped) until read,
  and ``conversation=True`` makes the rows, in order, one conversation.

Bad entries never stop the scan: each becomes a :class:`Problem` (reported, then skipped).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..audio.io import AudioError, decode_audio, read_audio, to_mono
from ..config import SAMPLE_RATE

AUDIO_SUFFIXES = (".wav", ".flac")
#: Audio recorded below this rate lacks most of what Mimi encodes at 24 kHz.
MIN_SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Columns:
    """Column names of a Hugging Face dataset (``--audio-column`` ...); the speaker column is optional."""

    audio: str = "audio"
    text: str = "text"
    speaker: str = "speaker"


class DatasetAudio:
    """One row's audio in a ``datasets.Dataset``, read from the (memory-mapped) table when needed."""

    def __init__(self, table: Any, index: int, column: str, root: Path):
        self.table, self.index, self.column, self.root = table, index, column, root

    def __str__(self) -> str:
        return f"{self.root.name}[{self.index}][{self.column!r}]"

    def source(self) -> str | io.BytesIO | tuple[np.ndarray, int]:
        """What the row holds: a path, the embedded file's bytes, or (samples, rate).

        Raises:
            AudioError: none of those.
        """
        value = self.table[self.index][self.column]
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            raise AudioError(f"{self}: expected an Audio value, a dict or a path, got {type(value).__name__}")
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        if value.get("array") is not None and value.get("sampling_rate") is not None:
            pcm = np.asarray(value["array"], dtype=np.float32)
            if pcm.ndim > 2:
                raise AudioError(f"{self}: array of shape {pcm.shape}, expected (samples,) or (channels, samples)")
            return (pcm[:, None] if pcm.ndim == 1 else pcm.T), int(value["sampling_rate"])
        if value.get("path"):
            return str(self.root / value["path"])  # absolute paths stay as they are
        raise AudioError(f"{self}: no bytes, path or array + sampling_rate")


@dataclass
class Utterance:
    """One clip and its transcript; ``conversation`` groups clips spoken in order."""

    audio: Path | DatasetAudio
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
         min_sample_rate: int = MIN_SAMPLE_RATE, columns: Columns = Columns(),
         split: str = "train") -> tuple[list[Utterance], list[Problem]]:
    """Utterances of a folder, a ``.jsonl`` manifest or a Hugging Face dataset, and the problems found.

    Args:
        columns: a Hugging Face dataset's column names.
        split: which split of a saved ``DatasetDict`` (or of an ``audiofolder``).

    Raises:
        ValueError: ``source`` is none of those, a dataset lacks a column or the ``datasets``
            package (one error: nothing to train on is not per-sample).
    """
    path = Path(source).expanduser()
    if path.is_dir() and is_hf_dataset(path):
        found, problems = _scan_hf_dataset(path, speaker, conversation, columns, split)
    elif path.is_dir():
        found, problems = _scan_folder(path, speaker, conversation)
    elif path.is_file() and path.suffix == ".jsonl":
        found, problems = _scan_manifest(path, speaker)
    else:
        raise ValueError(f"training data must be a folder of .wav + .txt, a .jsonl manifest or a Hugging Face "
                         f"dataset folder, got {source}")
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
        frames, rate = audio_info(utt.audio)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError; rows AudioError
        return f"unreadable audio {utt.audio}: {err}"
    if frames == 0:
        return f"empty audio {utt.audio}"
    if declared_rate is not None and declared_rate != rate:
        return f"sample rate {rate} Hz, but the manifest says {declared_rate} Hz"
    if rate < min_sample_rate:
        return f"sample rate {rate} Hz is below the minimum {min_sample_rate} Hz"
    return None


def audio_info(audio: Path | DatasetAudio) -> tuple[int, int]:
    """(frames, sample rate) of an utterance's audio, without decoding all of it."""
    source = audio.source() if isinstance(audio, DatasetAudio) else str(audio)
    if isinstance(source, tuple):
        return source[0].shape[0], source[1]
    info = sf.info(source)
    return info.frames, info.samplerate


def read_utterance_audio(audio: Path | DatasetAudio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 PCM at ``sample_rate``: files and dataset rows take the same read/downmix/resample.

    Raises:
        AudioError: unreadable or empty.
    """
    if not isinstance(audio, DatasetAudio):
        return read_audio(audio, sample_rate)
    source = audio.source()
    if isinstance(source, tuple):
        return to_mono(*source, sample_rate, name=str(audio))
    if isinstance(source, str):
        return read_audio(source, sample_rate)
    return decode_audio(source, sample_rate, name=str(audio))


def audio_fingerprint(audio: Path | DatasetAudio) -> str:
    """Identifies the audio for the Mimi code cache: a file's path, size and mtime; a row's content."""
    source = audio.source() if isinstance(audio, DatasetAudio) else audio
    if isinstance(source, (str, Path)):
        stat = Path(source).stat()
        return f"{Path(source).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if isinstance(source, tuple):
        pcm, rate = source
        return f"array|{rate}|{pcm.shape}|{hashlib.sha1(np.ascontiguousarray(pcm).tobytes()).hexdigest()}"
    return f"bytes|{hashlib.sha1(source.getvalue()).hexdigest()}"


def is_hf_dataset(folder: Path) -> bool:
    """A ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``) or an ``audiofolder`` with metadata."""
    markers = ("dataset_dict.json", "state.json", "metadata.csv", "metadata.jsonl")
    return any((folder / name).is_file() for name in markers)


def _import_datasets(folder: Path):
    """The optional ``datasets`` package, or one error naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{folder} is a Hugging Face dataset; reading it needs the datasets package: "
                         "pip install 'csm-mlx[datasets]'") from None
    return datasets


def _load_hf_dataset(datasets, folder: Path, split: str):
    """The ``datasets.Dataset`` in ``folder`` (one split)."""
    if (folder / "metadata.csv").is_file() or (folder / "metadata.jsonl").is_file():
        return _audiofolder(datasets, folder)
    table = datasets.load_from_disk(str(folder))
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise ValueError(f"{folder} has splits {sorted(table)}, not {split!r}: choose one with --split")
        table = table[split]
    return table


def _audiofolder(datasets, folder: Path):
    """An ``audiofolder``'s metadata as a table whose ``audio`` column holds the ``file_name`` paths.

    ``load_dataset("audiofolder")`` would need torchcodec just to store the paths; the metadata
    file (top level only) is all it reads besides the audio files.
    """
    import pandas

    csv = folder / "metadata.csv"
    metadata = pandas.read_csv(csv) if csv.is_file() else pandas.read_json(folder / "metadata.jsonl", lines=True)
    if "file_name" not in metadata:
        raise ValueError(f"{folder}: the audiofolder metadata has no file_name column")
    return datasets.Dataset.from_pandas(metadata.rename(columns={"file_name": "audio"}), preserve_index=False)


def _scan_hf_dataset(folder: Path, speaker: int | None, conversation: bool, columns: Columns, split: str):
    datasets = _import_datasets(folder)
    table = _load_hf_dataset(datasets, folder, split)
    names = table.column_names
    for role, column in (("audio", columns.audio), ("text", columns.text)):
        if column not in names:
            raise ValueError(f"{folder} has no {role} column {column!r} (columns: {', '.join(names)}); "
                             f"name it with --{role}-column")
    has_speaker = columns.speaker in names
    if not has_speaker and speaker is None:
        raise ValueError(f"{folder} has no speaker column {columns.speaker!r} (columns: {', '.join(names)}): "
                         "pass --speaker or name it with --speaker-column")
    if isinstance(table.features[columns.audio], datasets.Audio):
        table = table.cast_column(columns.audio, datasets.Audio(decode=False))  # bytes/path, read by soundfile
    audio = table.select_columns([columns.audio])
    rows = table.select_columns([columns.text] + ([columns.speaker] if has_speaker else []))
    found, problems = [], []
    for index, row in enumerate(rows):
        name = f"{folder.name}[{index}]"
        who = row.get(columns.speaker) if has_speaker else None
        if isinstance(who, float) and who.is_integer():  # an integer column with gaps reads as float
            who = int(who)
        try:
            who = speaker if who is None else _speaker_id(who)
        except ValueError:
            problems.append(Problem(name, f"speaker {who!r} is not a non-negative integer"))
            continue
        if who is None:
            problems.append(Problem(name, "no speaker: the row's is empty and there is no --speaker"))
            continue
        text = str(row[columns.text] or "").strip()
        group = folder.name if conversation else None
        found.append((Utterance(DatasetAudio(audio, index, columns.audio, folder), text, who, name, group), None))
    return found, problems


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
