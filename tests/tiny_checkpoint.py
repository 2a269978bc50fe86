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

    Random weights make Mimi's signals huge (~1e5): the last decoder convolution is scaled so
    that audio peaks near 0.5 and 16-bit files hold a waveform rather than clipped samples, and
    the encoder's so that its output has unit spread. Without the latter the quantizer compares
    ~1e6-sized latents with O(1) codebook entries, where float32 rounding picks the codes, and
    no two implementations agree. The encoder's biases are shrunk (x0.1) so that the codes
    follow the signal rather than a constant offset.
    """
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(tiny_config()).eval()
    randomize_(model, seed)
    codec = model.codec_model
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 32, 8), generator=torch.Generator().manual_seed(seed))
    t = torch.arange(4 * 1920) / 24_000
    chirp = (0.3 * torch.sin(2 * torch.pi * (300 + 2000 * t) * t))[None, None]
    with torch.no_grad():
        peak = codec.decode(codes).audio_values.abs().max()
        last_conv = [m for m in codec.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
        last_conv.weight.mul_(0.5 / peak)
        last_conv.bias.mul_(0.5 / peak)
        seanet = codec.encoder.encoder_seanet
        convs = [m for m in seanet.modules() if isinstance(m, torch.nn.Conv1d)]
        for conv in convs:
            conv.bias.mul_(0.1)
        spread = seanet(chirp).std()
        convs[-1].weight.div_(spread)
        convs[-1].bias.div_(spread)
    return model


def make_turns_end_(model, *, end_bias: float = 2.5, chain_bias: float = 5.0, last_bias: float = 2.5) -> None:
    """Bias a tiny model so that turns end by the all-zero frame after a few frames (in place).

    With 64 random codes per codebook an all-zero frame has probability ~64^-32, so a random
    model never ends a turn. Two hidden "wires" that no layer writes to (their rows in every
    ``o_proj`` / ``down_proj`` are zeroed, so the residual stream carries them unchanged):

    * backbone dim 0 is constant (every text and audio row has it), and ``lm_head`` reads it
      only for code 0 (``end_bias``): codebook 0 is 0 now and then;
    * backbone dim 1 flags code 0 in the audio embeddings; the projection copies it into the
      depth decoder's dim 0 and ``codebooks_head`` reads it only for code 0, so after a 0 the
      next codebook is likely 0 too (``chain_bias``; ``last_bias`` for codebook 31, weaker).
      The backbone's final norm drops dim 1, so codebook 1 does not see it through the
      backbone state.

    A frame that starts with 0 is then usually the end frame, and sometimes a "near end": 0 in
    codebooks 0..30 but not in 31, which an end test on codebook 0 alone, or on the first 31
    codebooks (as transformers' ``generate`` does), would take for the end. Other codes stay
    random. With the defaults the official loop ends a 20-token prompt's turn after a median
    of 4-5 frames; over 40 seeds 8 turns end at once, none reaches 20 frames, and 29 frames
    are near ends.
    """
    vocab = model.config.vocab_size
    backbone, depth = model.backbone_model, model.depth_decoder
    audio = backbone.embed_tokens.embed_audio_tokens.weight  # (32 * vocab, d): row = codebook * vocab + code
    with torch.no_grad():
        model.embed_text_tokens.weight[:, 0] = 4.0
        audio[:, 0] = 4.0 / 32  # an audio row sums 32 embeddings
        audio[:, 1] = 0.0
        audio[::vocab, 1] = 4.0
        for layer in list(backbone.layers) + list(depth.model.layers):
            layer.self_attn.o_proj.weight[:2] = 0.0
            layer.mlp.down_proj.weight[:2] = 0.0
        backbone.norm.weight[:2] = torch.tensor([1.0, 0.0])
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[0, 0] = end_bias
        projection = depth.model.inputs_embeds_projector.weight
        projection[0] = 0.0
        projection[0, 1] = 1.0
        depth.model.norm.weight[0] = 1.0
        head = depth.codebooks_head.weight  # (31, hidden, vocab): head[i - 1] gives codebook i
        head[:, 0, :] = 0.0
        head[:, 0, 0] = chain_bias
        head[-1, 0, 0] = last_bias


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


def write_model_dir(path: Path, seed: int = 0, *, turns_end: bool = False):
    """Write the tiny model directory (transformers layout + tokenizer.json); return the torch model.

    ``turns_end``: apply :func:`make_turns_end_` first (a model whose turns end by the end frame).
    """
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_csm(seed)
    if turns_end:
        make_turns_end_(model)
    model.save_pretrained(path)
    write_tokenizer(path / "tokenizer.json")
    return model
