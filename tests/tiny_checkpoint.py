"""A complete tiny CSM model directory in the real transformers layout, for end-to-end tests.

``write_model_dir(path)`` writes what ``CsmForConditionalGeneration.save_pretrained`` writes
(config.json + model.safetensors, Mimi under ``codec_model.*``) for a tiny random config whose
Mimi still has the real frame geometry (24 kHz, 1920 samples per frame, 32 codebooks), plus a
byte-level BPE ``tokenizer.json`` with the Llama-3 special tokens. Every parameter and buffer
is re-randomised so that nothing compared is trivially zero or identity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from csm_reference import ROPE_BACKBONE, ROPE_DECODER
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CODEBOOK_SIZE = 64  # tiny Mimi bins; the tiny CSM's audio vocabulary is the same, so every code decodes
_CORPUS = [
    "Hello from Sesame. The past is just a story we tell ourselves.",
    "How are you today? I am fine, thank you! This is a test of speech synthesis.",
    "Long text is split into sentences; each sentence is spoken with the previous one as context.",
]


def tiny_config():
    """A tiny CsmConfig (2+2 layers) whose codec keeps Mimi's real 1920-sample frames."""
    from transformers import CsmConfig, MimiConfig

    codec = MimiConfig(
        hidden_size=32, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
        codebook_size=CODEBOOK_SIZE, codebook_dim=16, vector_quantization_hidden_dimension=16,
        upsample_groups=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_quantizers=32, sliding_window=250,
    )
    depth = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, backbone_hidden_size=64, vocab_size=CODEBOOK_SIZE, num_codebooks=32,
        rope_parameters=dict(ROPE_DECODER),
    )
    return CsmConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, text_vocab_size=512, vocab_size=CODEBOOK_SIZE, num_codebooks=32,
        codebook_pad_token_id=CODEBOOK_SIZE - 1, rope_parameters=dict(ROPE_BACKBONE),
        depth_decoder_config=depth, codec_config=codec.to_dict(),
    )


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every saved parameter and buffer (zero/one/identity inits prove nothing).

    Derived, non-persistent buffers (RoPE frequencies) are left alone; Mimi's codebook usage
    counts stay positive (they divide the embedding sums).
    """
    generator = torch.Generator().manual_seed(seed)
    saved = set(module.state_dict())
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name not in saved or not tensor.is_floating_point():
                continue
            if name.endswith("cluster_usage"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("initialized"):
                tensor.fill_(1.0)
            else:
                scale = 1.0 if tensor.ndim <= 1 else tensor.shape[-1] ** -0.5
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


def build_tiny_csm(seed: int = 0):
    """The tiny transformers CsmForConditionalGeneration, float32, eval mode, re-randomised.

    Random weights make Mimi's output huge (~1e5); the last decoder convolution is scaled so that
    audio peaks near 0.5 and 16-bit files hold a waveform rather than clipped samples.
    """
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(tiny_config()).eval()
    randomize_(model, seed)
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 32, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        peak = model.codec_model.decode(codes).audio_values.abs().max()
        last_conv = [m for m in model.codec_model.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
        last_conv.weight.mul_(0.5 / peak)
        last_conv.bias.mul_(0.5 / peak)
    return model


def write_tokenizer(path: Path) -> Path:
    """A small byte-level BPE tokenizer.json with the Llama-3 BOS/EOS special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.save(str(path))
    return path


def write_model_dir(path: Path, seed: int = 0):
    """Write the tiny model directory (transformers layout + tokenizer.json); return the torch model."""
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_csm(seed)
    model.save_pretrained(path)
    write_tokenizer(path / "tokenizer.json")
    return model
