"""How much a rare identifier moves a shapes-world text encoder's encoding of a prompt, against a colour word.

A web-trained text encoder knows rare tokens such as "sks" as words of weak meaning: swapping one into
a prompt changes the encoding less than a colour word does, but not by a trivial amount, so that a
rare identifier can carry a subject without tuning the text encoder. Run:

    python benchmarks/world_token_priors.py [--model PIPELINE_DIR]
"""

from __future__ import annotations

import argparse

import torch


def encoding_shift(pipe, prompt: str, other: str) -> float:
    """Relative Frobenius distance between two prompts' token encodings (all 77 positions)."""
    tokens = pipe.tokenizer([prompt, other], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids)[0]
    return float((hidden[0] - hidden[1]).norm() / hidden[1].norm())


def main() -> None:
    from dreamtune.pipeline import load_pipeline
    from dreamtune.world import MODEL_DIR, render

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    rare = render.rare_words()[:40]
    rows = []
    for cls in render.CLASSES:
        plain = f"a photo of a {cls}"
        identifier = [encoding_shift(pipe, f"a photo of a {w} {cls}", plain) for w in rare]
        colour = [encoding_shift(pipe, f"a photo of a {c} {cls}", plain) for c in render.COLOURS]
        sks = encoding_shift(pipe, f"a photo of a sks {cls}", plain)
        rows.append((cls, sks, sum(identifier) / len(identifier), sum(colour) / len(colour)))
    print(f"model: {args.model}")
    print(f"{'class':<9} {'sks':>6} {'rare (40)':>10} {'colour (8)':>11} {'rare/colour':>12}")
    for cls, sks, ident, col in rows:
        print(f"{cls:<9} {sks:>6.3f} {ident:>10.3f} {col:>11.3f} {ident / col:>12.2f}")


if __name__ == "__main__":
    main()
