"""csm.training.loss vs transformers' CsmForConditionalGeneration loss and torch autograd gradients.

The reference runs transformers' own training path: 2-D ``input_ids`` with ``<|AUDIO|>`` /
``<|audio_eos|>`` placeholders, raw ``input_values`` (Mimi-encoded inside the model) and 2-D
``labels`` whose ``-101`` marks the frames the depth decoder skips. Our side gets the same frames
as 33-column rows (text rows, audio rows, all-zero end frame) and the same decoder subset.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from csm.models import build_csm
from csm.prompt import audio_rows, text_rows
from csm.training import Batch, csm_loss, select_decoder_rows
from csm.weights.csm_checkpoint import args_from_config
from csm_reference import hf_state_to_mlx
from tiny_checkpoint import build_tiny_csm

#: Measured: loss relative error ~1e-7, gradient relative error (max |diff| / max |ref| per tensor) ~1e-6.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
AUDIO_ID, AUDIO_EOS_ID, PAD_ID = 510, 511, 0
#: Each batch row is a conversation: (text length, audio frames) per segment.
CONVERSATIONS = [[(5, 3), (4, 4)], [(6, 5)]]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf():
    model = build_tiny_csm(seed=0)
    # The tiny text vocabulary (512) must hold the placeholder ids the merge step looks up.
    model.config.audio_token_id, model.config.audio_eos_token_id = AUDIO_ID, AUDIO_EOS_ID
    return model


@pytest.fixture(scope="module")
def model(hf):
    return build_csm(args_from_config(hf.config.to_dict()), hf_state_to_mlx(hf), dtype="float32")


@pytest.fixture(scope="module")
def conversation(hf):
    """Both views of one batch: transformers inputs and our rows (codes from the same Mimi call)."""
    rng = np.random.default_rng(3)
    rows, ids, audio = [], [], []
    for segments in CONVERSATIONS:
        parts, row_ids, row_audio = [], [], []
        for n_text, n_frames in segments:
            text = rng.integers(1, 500, n_text).tolist()
            pcm = rng.standard_normal(n_frames * 1920).astype(np.float32) * 0.1
            with torch.no_grad():
                codes = hf.codec_model.encode(torch.from_numpy(pcm)[None, None]).audio_codes[0].numpy()
            parts += [text_rows(text), audio_rows(codes)]
            row_ids += text + [AUDIO_ID] * n_frames + [AUDIO_EOS_ID]
            row_audio.append(pcm)
        rows.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
        ids.append(row_ids)
        audio.append(row_audio)
    return rows, ids, audio


def our_batch(conversation, decoder_rows: np.ndarray | None = None, *, fraction: float = 0.5) -> Batch:
    rows, ids, _ = conversation
    length = max(len(r) for r in ids)
    tokens = np.zeros((len(rows), length, 33), np.int32)
    mask = np.zeros((len(rows), length, 33), bool)
    targets = np.zeros((len(rows), length), bool)
    for b, ((tok, msk), row_ids) in enumerate(zip(rows, ids)):
        tokens[b, : len(tok)], mask[b, : len(tok)] = tok, msk
        targets[b, : len(row_ids)] = np.isin(row_ids, [AUDIO_ID, AUDIO_EOS_ID])
    if decoder_rows is None:
        decoder_rows = select_decoder_rows(targets, fraction, np.random.default_rng(0))
    return Batch(mx.array(tokens), mx.array(mask), mx.array(targets), mx.array(decoder_rows))


def hf_inputs(conversation, decoder_rows: np.ndarray) -> dict:
    """transformers' inputs: placeholders, padded audio with cutoffs, labels with -101 on skipped frames."""
    _, ids, audio = conversation
    length, samples = max(len(r) for r in ids), max(sum(len(a) for a in row) for row in audio)
    input_ids = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
    values = torch.zeros((len(ids), 1, samples))
    cutoffs = torch.full((len(ids), max(len(row) for row in audio)), -1, dtype=torch.long)
    for b, (row_ids, row_audio) in enumerate(zip(ids, audio)):
        input_ids[b, : len(row_ids)] = torch.tensor(row_ids)
        pcm = np.concatenate(row_audio)
        values[b, 0, : len(pcm)] = torch.from_numpy(pcm)
        cutoffs[b, : len(row_audio)] = torch.tensor(np.cumsum([len(a) for a in row_audio]))
    is_audio = (input_ids == AUDIO_ID) | (input_ids == AUDIO_EOS_ID)
    labels = torch.where(is_audio, input_ids, torch.full_like(input_ids, -100))
    skipped = is_audio.flatten().clone()
    skipped[torch.from_numpy(decoder_rows.astype(np.int64))] = False
    labels.view(-1)[skipped] = -101
    return dict(input_ids=input_ids, input_values=values, input_values_cutoffs=cutoffs, labels=labels)


def hf_loss_and_grads(hf, inputs: dict):
    hf.zero_grad()
    out = hf(**inputs)
    out.loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in hf.named_parameters() if p.grad is not None}
    return out, grads


def test_decoder_rows_are_a_random_fraction_of_scored_frames():
    targets = np.zeros((2, 40), bool)
    targets[0, 5:37], targets[1, 3:35] = True, True  # 64 scored frames
    rows = select_decoder_rows(targets, 1 / 16, np.random.default_rng(1))
    assert len(rows) == 4 and len(set(rows.tolist())) == 4 and targets.flatten()[rows].all()
    other = select_decoder_rows(targets, 1 / 16, np.random.default_rng(2))
    assert rows.tolist() != other.tolist()
    assert select_decoder_rows(targets, 1.0, np.random.default_rng(1)).tolist() == np.flatnonzero(targets).tolist()
    assert len(select_decoder_rows(targets[:, :6], 1 / 16, np.random.default_rng(1))) == 1  # never zero
    with pytest.raises(ValueError, match="fraction"):
        select_decoder_rows(targets, 0.0, np.random.default_rng(1))


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_loss_and_gradients_equal_transformers(hf, model, conversation, fraction):
    batch = our_batch(conversation, fraction=fraction)
    decoder_rows = np.array(batch.decoder_rows)
    assert 0 < len(decoder_rows) <= int(np.array(batch.targets).sum())
    out, want = hf_loss_and_grads(hf, hf_inputs(conversation, decoder_rows))

    def loss_fn(m):
        return csm_loss(m, batch)

    (loss, (backbone, decoder)), grads = nn.value_and_grad(model, loss_fn)(model)
    for got, ref in [(loss, out.loss), (backbone, out.backbone_loss), (decoder, out.depth_decoder_loss)]:
        assert abs(got.item() - ref.item()) <= LOSS_RTOL * abs(ref.item()), (got.item(), ref.item())

    # The torch gradients go through the same loader as weights (key map, q/k RoPE row permutation,
    # any projection fusion): a linear re-indexing, so it maps gradients too, whatever our layout.
    got = dict(tree_flatten(grads))
    want = dict(tree_flatten(build_csm(model.args, {k: mx.array(g) for k, g in want.items()}).parameters()))
    assert set(got) == set(want), set(got) ^ set(want)
    want = {k: np.array(v) for k, v in want.items()}
    errors = {k: np.abs(np.array(got[k]) - want[k]).max() / np.abs(want[k]).max() for k in want}
    worst = max(errors, key=errors.get)
    print(f"loss {loss.item():.6f} vs {out.loss.item():.6f}; worst grad {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= GRAD_RTOL, (worst, errors[worst])
    assert all(np.abs(w).max() > 0 for w in want.values())  # every parameter receives a gradient


def test_no_decoder_rows_scores_only_the_backbone(model, conversation):
    full, (backbone, _) = csm_loss(model, our_batch(conversation, fraction=1.0))
    alone, (backbone_alone, decoder) = csm_loss(model, our_batch(conversation, np.zeros((0,), np.int32)))
    assert decoder.item() == 0.0 and alone.item() == backbone_alone.item() == backbone.item() < full.item()
