"""Text and context audio → the CSM prompt: rows of 33 columns (32 Mimi codes + 1 text token).

Layout (official ``generator.py``, spec ``csm.md`` §2.2, §3.2, §3.3):

* a text segment is ``[BOS] + tokens("[speaker]text") + [EOS]``, one row per token, the id in
  column 32 and only that column unmasked;
* an audio segment is one row per Mimi frame, codes in columns 0..31 (unmasked), followed by
  one all-zero "end of audio" frame;
* a context segment is its text rows then its audio rows; the prompt ends with the text rows
  of what to say next.

Everything here is host-side NumPy: the prompt is built once per generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from .config import FRAME_WIDTH, NUM_CODEBOOKS

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


@dataclass
class Segment:
    """One utterance of a conversation: who spoke, what they said, and (optionally) how it sounded.

    Attributes:
        speaker: speaker id, written into the text as ``[speaker]``.
        text: the transcript.
        audio: mono float32 PCM at 24 kHz (Mimi-encoded before use), or None for text only.
        codes: Mimi codes ``(32, T)`` if already known (e.g. a generated turn); preferred over
            ``audio`` because it skips the encoder.
    """

    speaker: int
    text: str
    audio: np.ndarray | None = field(default=None, repr=False)
    codes: np.ndarray | None = field(default=None, repr=False)


class TextTokenizer:
    """The Llama-3.2 tokenizer with CSM's ``[BOS] ... [EOS]`` template on every segment."""

    def __init__(self, tokenizer: Tokenizer):
        bos_id = tokenizer.token_to_id(BOS_TOKEN)
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if bos_id is None or eos_id is None:
            raise ValueError(f"tokenizer lacks the Llama-3 special tokens {BOS_TOKEN} / {EOS_TOKEN}")
        tokenizer.post_processor = TemplateProcessing(
            single=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0",
            pair=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0 {BOS_TOKEN}:1 $B:1 {EOS_TOKEN}:1",
            special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
        )
        self._tokenizer = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """Load a ``tokenizer.json`` (Hugging Face ``tokenizers`` format)."""
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:
            raise ValueError(f"cannot load tokenizer {path}: {err}") from None

    def encode_turn(self, speaker: int, text: str) -> list[int]:
        """Token ids of ``[speaker]text`` with BOS/EOS, as the official generator encodes a turn."""
        return self._tokenizer.encode(f"[{speaker}]{text}").ids


def text_rows(token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows for text tokens: ``(S, 33)`` int32 tokens and bool mask (only column 32 set)."""
    tokens = np.zeros((len(token_ids), FRAME_WIDTH), dtype=np.int32)
    mask = np.zeros((len(token_ids), FRAME_WIDTH), dtype=bool)
    tokens[:, -1] = token_ids
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows for Mimi codes ``(32, T)`` plus the all-zero end frame: ``(T+1, 33)`` tokens and mask."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != NUM_CODEBOOKS:
        raise ValueError(f"context codes must have shape (32, T), got {codes.shape}")
    frames = codes.shape[1] + 1
    tokens = np.zeros((frames, FRAME_WIDTH), dtype=np.int32)
    mask = np.zeros((frames, FRAME_WIDTH), dtype=bool)
    tokens[:-1, :NUM_CODEBOOKS] = codes.T
    mask[:, :NUM_CODEBOOKS] = True
    return tokens, mask


def build_prompt(
    tokenizer: TextTokenizer, context: list[Segment], speaker: int, text: str
) -> tuple[np.ndarray, np.ndarray]:
    """The whole prompt: each context segment's text and audio rows, then the new turn's text.

    Context segments must carry ``codes`` (the generation layer Mimi-encodes ``audio`` first).

    Returns:
        tokens ``(S, 33)`` int32 and mask ``(S, 33)`` bool.
    """
    parts = []
    for segment in context:
        parts.append(text_rows(tokenizer.encode_turn(segment.speaker, segment.text)))
        if segment.codes is not None:
            parts.append(audio_rows(segment.codes))
        elif segment.audio is not None:
            raise ValueError("context audio must be Mimi-encoded into Segment.codes first")
    parts.append(text_rows(tokenizer.encode_turn(speaker, text)))
    tokens = np.concatenate([p[0] for p in parts])
    mask = np.concatenate([p[1] for p in parts])
    return tokens, mask


def segment_length(tokenizer: TextTokenizer, segment: Segment) -> int:
    """Prompt rows one context segment takes (text tokens + frames + end frame)."""
    frames = 0 if segment.codes is None else np.asarray(segment.codes).shape[1] + 1
    return len(tokenizer.encode_turn(segment.speaker, segment.text)) + frames
