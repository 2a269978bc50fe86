"""Long text → sentence-sized chunks (punctuation kept) and the default audio length cap."""

from __future__ import annotations

import re

from ..config import FRAME_MS

# A sentence ends at . ! ? … (optionally followed by closing quotes/brackets) and whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"')\]])\s+")

#: The default cap: a fixed allowance plus a per-character one. Conversational English runs at
#: roughly 12-16 characters per second (≈ 70 ms per character); 150 ms per character gives
#: about twice that, so slow or expressive delivery is not clipped, while a model that misses
#: its end frame stops within seconds instead of running to the official 90 s.
BASE_MS = 3_000
MS_PER_CHAR = 150
#: The official generator's default cap (90 s).
MAX_MS = 90_000


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Split ``text`` into sentences, merging short neighbours up to ``max_chars`` characters.

    Newlines are treated as whitespace; a single sentence longer than ``max_chars`` is kept
    whole (the caller's context check reports it if it cannot fit).
    """
    sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]
    chunks: list[str] = []
    for sentence in sentences:
        if chunks and len(chunks[-1]) + 1 + len(sentence) <= max_chars:
            chunks[-1] = f"{chunks[-1]} {sentence}"
        else:
            chunks.append(sentence)
    return chunks


def default_max_audio_ms(text: str) -> int:
    """Audio length cap for ``text``: ``3000 + 150 × characters`` ms, at most 90 s."""
    return min(MAX_MS, BASE_MS + MS_PER_CHAR * len(text))


def frames_for_ms(max_audio_ms: float) -> int:
    """Frames allowed for ``max_audio_ms`` (80 ms each), as the official generator counts them."""
    return int(max_audio_ms // FRAME_MS)
