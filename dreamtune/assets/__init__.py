"""Files that ship with dreamtune: the CLIP BPE tokenizer (see tools/make_clip_tokenizer.py)."""

from pathlib import Path

CLIP_TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
