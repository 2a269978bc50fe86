"""Voices: saved context segments (audio + transcript) that fix who is speaking.

The base model picks a new voice on every run unless the prompt carries audio of the voice
(spec ``csm.md`` §7). A voice is one or more segments given as:

* a folder of ``name.wav`` files, each with its transcript in ``name.txt`` (taken in name order),
  or with a ``voice.json`` inside;
* a JSON file: ``[{"audio": "a.wav", "text": "...", "speaker": 0}, ...]`` (paths relative to it);
* a named voice shipped with the weights: ``conversational_a`` / ``conversational_b`` are the
  prompts of ``sesame/csm-1b`` (``prompts/*.wav``), read from the weights folder if present,
  else downloaded from the weights' hub repo if it has them, else from ``sesame/csm-1b`` (gated).

To clone a voice the context must carry the same speaker id as the new turn, so segments
without an explicit ``speaker`` take the speaker being generated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..audio import read_audio
from ..prompt import Segment
from ..weights.hub import ModelNotAvailable, resolve_file

logger = logging.getLogger(__name__)

#: The official prompts (``SesameAILabs/csm`` ``run_csm.py``): file in the weights repo, transcript.
NAMED_VOICES: dict[str, tuple[str, str]] = {
    "conversational_a": (
        "prompts/conversational_a.wav",
        "like revising for an exam I'd have to try and like keep up the momentum because I'd start really "
        "early I'd be like okay I'm gonna start revising now and then like you're revising for ages and then "
        "I just like start losing steam I didn't do that for the exam we had recently to be fair that was a "
        "more of a last minute scenario but like yeah I'm trying to like yeah I noticed this yesterday that "
        "like Mondays I sort of start the day with this not like a panic but like a",
    ),
    "conversational_b": (
        "prompts/conversational_b.wav",
        "like a super Mario level. Like it's very like high detail. And like, once you get into the park, it "
        "just like, everything looks like a computer game and they have all these, like, you know, if, if "
        "there's like a, you know, like in a Mario game, they will have like a question block. And if you "
        "like, you know, punch it, a coin will come out. So like everyone, when they come into the park, they "
        "get like this little bracelet and then you can go punching question blocks around.",
    ),
}
#: Where named voices are downloaded from when the weights folder lacks them.
VOICE_REPO = "sesame/csm-1b"


def load_voice(
    voice: str | Path, speaker: int, *, weights_dir: Path | None = None, weights_repo: str | None = None
) -> list[Segment]:
    """Read a voice (folder, JSON file or name) into context segments.

    Args:
        voice: see the module docstring.
        speaker: speaker id for segments that don't name one (the speaker being generated).
        weights_dir: the resolved weights folder, searched first for named voices.
        weights_repo: the hub repo the weights came from, tried next.

    Raises:
        ValueError: the voice cannot be found or is malformed (audio errors name the file).
    """
    path = Path(voice).expanduser()
    if path.is_dir():
        listing = path / "voice.json"
        return _from_json(listing, speaker) if listing.is_file() else _from_folder(path, speaker)
    if path.is_file():
        return _from_json(path, speaker)
    if str(voice) in NAMED_VOICES:
        filename, transcript = NAMED_VOICES[str(voice)]
        return [Segment(speaker, transcript, read_audio(_named_voice_file(filename, weights_dir, weights_repo)))]
    raise ValueError(
        f"voice {voice!r} not found: give a folder of .wav + .txt files, a JSON file, "
        f"or one of {', '.join(NAMED_VOICES)}"
    )


def _named_voice_file(filename: str, weights_dir: Path | None, weights_repo: str | None) -> Path:
    if weights_dir is not None and (weights_dir / filename).is_file():
        return weights_dir / filename
    if weights_repo and weights_repo != VOICE_REPO:
        try:
            return resolve_file(weights_repo, filename)
        except ModelNotAvailable:
            logger.info("%s has no %s; trying %s", weights_repo, filename, VOICE_REPO)
    return resolve_file(VOICE_REPO, filename)


def _from_folder(folder: Path, speaker: int) -> list[Segment]:
    wavs = sorted(folder.glob("*.wav")) + sorted(folder.glob("*.flac"))
    if not wavs:
        raise ValueError(f"voice folder {folder} has no .wav/.flac files")
    segments = []
    for wav in wavs:
        transcript = wav.with_suffix(".txt")
        if not transcript.is_file():
            raise ValueError(f"voice folder {folder}: {wav.name} has no transcript {transcript.name}")
        segments.append(Segment(speaker, transcript.read_text().strip(), read_audio(wav)))
    return segments


def _from_json(listing: Path, speaker: int) -> list[Segment]:
    try:
        entries = json.loads(listing.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"voice file {listing} is not valid JSON: {err}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"voice file {listing} must be a non-empty list of {{audio, text[, speaker]}} objects")
    segments = []
    for entry in entries:
        if "audio" not in entry or "text" not in entry:
            raise ValueError(f"voice file {listing}: every entry needs 'audio' and 'text', got {sorted(entry)}")
        audio = read_audio(listing.parent / entry["audio"])
        segments.append(Segment(int(entry.get("speaker", speaker)), str(entry["text"]), audio))
    return segments
