"""Build CLIP tokenizer files (vocab.json, merges.txt) from open_clip's BPE merges file.

The Hub cannot be reached where dreamtune is developed, so the tokenizer that the tests and the
shapes world use is rebuilt from the BPE file that the open_clip_torch wheel carries, the way CLIP
builds its vocabulary. Usage:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl dreamtune/assets/clip_tokenizer
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build(bpe_gz: bytes, out_dir: Path) -> int:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    else:
        data = source.read_bytes()
    print(f"{build(data, out)} tokens written to {out}")


if __name__ == "__main__":
    main()
