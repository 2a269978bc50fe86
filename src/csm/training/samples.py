"""Utterances → Mimi codes (encoded once, cached on disk) → training samples in the prompt layout.

A sample is a conversation turn laid out as the official prompt (:mod:`csm.prompt`): each context
segment's text rows and audio rows (with the all-zero end frame), then the turn's text rows and
audio rows. The turn's audio rows, end frame included, are scored; context audio only with
``score_context=True`` (transformers' processor scores every audio frame of a conversation).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..audio import AudioError
from ..config import MAX_SEQ_LEN
from ..prompt import TextTokenizer, audio_rows, text_rows
from .batching import Sample
from .dataset import DatasetAudio, Problem, Utterance, audio_fingerprint, read_utterance_audio

logger = logging.getLogger(__name__)


@dataclass
class SampleStats:
    """What fitting samples into the context did."""

    kept: int = 0
    #: samples whose oldest context segments were dropped to fit ``max_len``.
    shortened: int = 0
    #: samples longer than ``max_len`` even without context.
    dropped: int = 0


def cache_key(audio: Path | DatasetAudio, tag: str) -> str:
    """Cache file stem for ``audio`` (a file: its absolute path, size and mtime; a dataset row: its
    content) and the codec ``tag``."""
    return hashlib.sha1(f"{audio_fingerprint(audio)}|{tag}".encode()).hexdigest()


def encode_utterances(
    utterances: list[Utterance], mimi, cache_dir: str | Path, *, tag: str = ""
) -> tuple[dict[str, np.ndarray], list[Problem]]:
    """Mimi codes ``(32, T)`` of every utterance by name; clips already in ``cache_dir`` are reused.

    Args:
        mimi: a :class:`csm.codec.Mimi` (anything with ``encode((1, 1, N)) -> (1, 32, T)``).
        tag: identifies the codec (e.g. its checkpoint), so another codec never reuses the cache.

    Returns:
        codes by utterance name, and the clips that could not be read.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    codes, problems, todo = {}, [], []
    for utt in utterances:
        try:
            path = cache_dir / f"{cache_key(utt.audio, tag)}.npy"
        except (OSError, AudioError) as err:  # gone since the scan
            problems.append(Problem(utt.name, str(err)))
            continue
        if path.is_file():
            codes[utt.name] = np.load(path)
        else:
            todo.append((utt, path))
    if codes:
        logger.info("reusing %d cached Mimi encodings from %s", len(codes), cache_dir)
    for utt, path in tqdm(todo, desc="Mimi-encoding", unit="clip", disable=not todo):
        try:
            pcm = read_utterance_audio(utt.audio)
        except AudioError as err:
            problems.append(Problem(utt.name, str(err)))
            continue
        clip = np.array(mimi.encode(mx.array(pcm)[None, None]))[0].astype(np.int16)  # (32, T)
        tmp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(tmp, clip)
        os.replace(tmp, path)
        codes[utt.name] = clip
    return codes, problems


def build_samples(
    utterances: list[Utterance],
    codes: dict[str, np.ndarray],
    tokenizer: TextTokenizer,
    *,
    context_turns: int = 0,
    max_len: int = MAX_SEQ_LEN,
    score_context: bool = False,
) -> tuple[list[Sample], SampleStats]:
    """One sample per encoded utterance, with up to ``context_turns`` earlier turns of its conversation.

    Too long for ``max_len`` rows: the oldest context turns go first (``shortened``); a turn that
    does not fit alone is dropped (``dropped``). Both counts are logged.
    """
    stats, samples = SampleStats(), []
    for turns in _conversations([u for u in utterances if u.name in codes]).values():
        for i, turn in enumerate(turns):
            parts = [_segment(tokenizer, u, codes[u.name], score_context) for u in turns[max(0, i - context_turns) : i]]
            parts.append(_segment(tokenizer, turn, codes[turn.name], True))
            wanted = len(parts)
            while len(parts) > 1 and sum(len(p[0]) for p in parts) > max_len:
                parts.pop(0)
            if sum(len(p[0]) for p in parts) > max_len:
                stats.dropped += 1
                logger.warning("dropped %s: %d rows > %d even without context", turn.name, len(parts[0][0]), max_len)
                continue
            stats.shortened += len(parts) < wanted
            tokens, mask, targets = (np.concatenate([p[j] for p in parts]) for j in range(3))
            samples.append(Sample(tokens, mask, targets, turn.name))
    stats.kept = len(samples)
    logger.info("%d samples (%d shortened to fit %d rows, %d dropped as too long)",
                stats.kept, stats.shortened, max_len, stats.dropped)
    return samples, stats


def _segment(tokenizer: TextTokenizer, utt: Utterance, clip: np.ndarray, scored: bool):
    """Rows of one turn: text then audio (+ end frame); targets on the audio rows when ``scored``."""
    text_tokens, text_mask = text_rows(tokenizer.encode_turn(utt.speaker, utt.text))
    audio_tokens, audio_mask = audio_rows(clip.astype(np.int32))
    targets = np.r_[np.zeros(len(text_tokens), bool), np.full(len(audio_tokens), scored)]
    return np.concatenate([text_tokens, audio_tokens]), np.concatenate([text_mask, audio_mask]), targets


def _conversations(utterances: list[Utterance]) -> OrderedDict[str, list[Utterance]]:
    groups: OrderedDict[str, list[Utterance]] = OrderedDict()
    for utt in utterances:
        key = utt.name if utt.conversation is None else f"conversation:{utt.conversation}"
        groups.setdefault(key, []).append(utt)
    return groups
