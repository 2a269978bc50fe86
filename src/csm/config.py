"""Constants shared by every layer of csm-mlx (defined once, imported everywhere).

Facts and sources: ``shared/spec/csm.md`` §1 and ``shared/spec/mimi.md`` §1.
"""

from __future__ import annotations

#: Mimi output sample rate (Hz).
SAMPLE_RATE: int = 24_000
#: Mimi frames per second (one CSM generation step = one frame).
FRAME_RATE: float = 12.5
#: PCM samples per Mimi frame (24000 / 12.5).
SAMPLES_PER_FRAME: int = 1_920
#: Milliseconds of audio per frame (the official generator's ``max_audio_length_ms / 80``).
FRAME_MS: int = 80
#: Mimi residual codebooks CSM uses.
NUM_CODEBOOKS: int = 32
#: Entries per CSM audio codebook head (Mimi's 2048 bins + 3 unused ids).
AUDIO_VOCAB_SIZE: int = 2_051
#: Llama-3.2 tokenizer vocabulary.
TEXT_VOCAB_SIZE: int = 128_256
#: Backbone context: text tokens + context frames + generated frames must fit.
MAX_SEQ_LEN: int = 2_048
#: Columns of one CSM frame row: 32 audio codes + 1 text token.
FRAME_WIDTH: int = NUM_CODEBOOKS + 1
