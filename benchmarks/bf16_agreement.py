"""bfloat16 agreement: csm-mlx vs the official PyTorch loop, both in bf16, same torch seed.

float32 is token-exact (tests/test_generation.py). In bfloat16 the two frameworks round matmuls and
softmaxes differently, so logits differ by a few bf16 ulps and, now and then, a sampled code differs;
after that the autoregressive runs follow different (equally valid) paths. This script measures, on
the tiny random test model, over several seeds and prompts: the share of frames generated before the
first differing code, and the share of identical codes in the first frame. Run from the repo root:
``python benchmarks/bf16_agreement.py [--seeds 20] [--frames 12]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import csm  # noqa: E402
from csm.generation import Turn  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402
from torch_reference import official_generate, official_prompt, official_tokenizer  # noqa: E402

TEXTS = ["Hello from Sesame.", "The past is just a story we tell ourselves.", "How are you today?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--frames", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reference = write_model_dir(Path(folder), seed=3).to(torch.bfloat16)
        ours = csm.load(folder, dtype="bfloat16")
        tokenizer = official_tokenizer(Path(folder) / "tokenizer.json")  # the reference's own prompt
    prefix, first_frame, total = [], [], 0
    for seed in range(args.seeds):
        for text in TEXTS:
            got = ours.synthesize([Turn(0, text)], torch_seed=seed, precision="reference",
                                  max_audio_length_ms=args.frames * 80).codes[0]
            tokens, mask = official_prompt(tokenizer, [], text, 0)
            want = official_generate(reference, tokens, mask, max_frames=args.frames, topk=50,
                                     temperature=0.9, seed=seed)
            n = min(got.shape[1], want.shape[1])
            same = np.all(got[:, :n] == want[:, :n], axis=0)
            prefix.append(int(np.argmin(same)) if not same.all() else n)
            first_frame.append(float(np.mean(got[:, 0] == want[:, 0])))
            total += n
    print(f"{len(prefix)} generations of {args.frames} frames (tiny random model, bf16, precision='reference')")
    print(f"identical whole generations: {sum(p == args.frames for p in prefix)}/{len(prefix)}")
    print(f"mean frames before the first differing code: {np.mean(prefix):.2f} of {args.frames}")
    print(f"identical codes in frame 0: {100 * np.mean(first_frame):.1f}%")


if __name__ == "__main__":
    main()
