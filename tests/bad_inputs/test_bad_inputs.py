"""Each row of cases.toml: a command line, the first line the user sees, and the exit code."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import pytest

from dreamtune.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CASES = tomllib.loads((Path(__file__).parent / "cases.toml").read_text(encoding="utf-8"))["case"]


@pytest.fixture(scope="session")
def finished_runs(tiny_model_dir, subject_dir, tmp_path_factory):
    """A finished DreamBooth run and a finished LoRA run on the tiny model."""
    from dreamtune.config import load_config
    from dreamtune.training import train

    runs = {}
    for method in ("dreambooth", "lora"):
        config = load_config(None, pretrained_model_name_or_path=str(tiny_model_dir), method=method, resolution=32,
                             max_train_steps=1, train_batch_size=1, validation_steps=0, checkpointing_steps=0,
                             output_dir=str(tmp_path_factory.mktemp("runs") / method),
                             concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog"}])
        runs[method] = train(config, progress=False).output_dir
    return runs


def _setup(kind: str, tmp: Path) -> None:
    if kind == "file":
        (tmp / "afile").write_text("not a folder")
    elif kind == "huge_image":
        # A PNG header that declares 20000 x 20000 pixels: decoders refuse it before reading any pixel.
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
        (tmp / "huge").mkdir()
        (tmp / "huge" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                             + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(case, tmp_path, capsys, tiny_model_dir, subject_dir, finished_runs):
    from dreamtune.world import MODEL_DIR

    places = {"model": str(tiny_model_dir), "world": str(MODEL_DIR), "subject": str(subject_dir), "tmp": str(tmp_path),
              "db_run": str(finished_runs["dreambooth"]), "lora_run": str(finished_runs["lora"]),
              "not_utf8": "run-\udcff"}
    if "setup" in case:
        _setup(case["setup"], tmp_path)
    code = main([arg.format(**places) for arg in case["argv"]])
    captured = capsys.readouterr()
    shown = (captured.err if code else captured.out).strip().splitlines()
    first = shown[0] if shown else ""
    assert code == case["code"], first
    assert first == case["first_line"].format(**places)
    assert "Traceback" not in captured.err
