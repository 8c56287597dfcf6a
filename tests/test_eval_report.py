"""Evaluation reports: metrics.json, markdown and a self-contained HTML page."""

from __future__ import annotations

import json
import re

from PIL import Image

from dreamtune.evaluate.report import markdown_table, text_table, write_csv, write_reports


def _result(tmp_path):
    (tmp_path / "images").mkdir()
    real_dir = tmp_path.parent / f"{tmp_path.name}_real"
    real_dir.mkdir()
    real = real_dir / "r0.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(real)
    prompts = []
    for p, prompt in enumerate(["a <sks> dog & a cat", "a dog on the moon"]):
        images = []
        for i in range(2):
            path = f"images/p{p}_{i}.png"
            Image.new("RGB", (40, 30), (p * 100, i * 100, 50)).save(tmp_path / path)
            images.append(path)
        prompts.append({"prompt": prompt, "scoring_prompt": prompt.replace("<sks> ", ""), "images": images,
                        "dino": 0.5 + p / 10, "clip_i": 0.7, "clip_t": 0.3, "div": None})
    return {"title": "Eval of run", "summary": {"dino": 0.55, "clip_i": 0.7, "clip_t": 0.3, "kid": None},
            "settings": {"seed": 0, "steps": 5}, "models": {"dino": "dino (x)"}, "prompts": prompts,
            "real_images": [str(real)], "notes": ["KID off"]}


def test_reports_are_written_and_self_contained(tmp_path):
    result = _result(tmp_path)
    paths = write_reports(result, tmp_path)
    assert json.loads(paths["json"].read_text()) == result
    md = paths["markdown"].read_text()
    assert "| a <sks> dog & a cat | 0.500 | 0.700 | 0.300 |" in md and "| 0.600 |" in md
    assert "DIV" not in md.split("## Per prompt")[1].split("\n")[2]  # an all-missing column is left out
    page = paths["html"].read_text()
    # One embedded thumbnail per image (4 generated + 1 real), linked to the full image by a relative path.
    assert len(re.findall(r'src="data:image/jpeg;base64,', page)) == 5
    assert 'href="images/p0_1.png"' in page and f'href="../{tmp_path.name}_real/r0.png"' in page
    assert str(tmp_path) not in page
    assert "a &lt;sks&gt; dog &amp; a cat" in page and "<sks>" not in page
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_linked_images_without_embedding(tmp_path):
    page = write_reports(_result(tmp_path), tmp_path, embed_images=False)["html"].read_text()
    assert "base64" not in page and 'src="images/p1_0.png"' in page


def test_tables_and_csv(tmp_path):
    rows = [{"method": "dreambooth", "dino": 0.6681, "clip_i": None}, {"method": "a|b", "dino": 0.5, "clip_i": 0.8}]
    cols = [("method", "Method"), ("dino", "DINO"), ("clip_i", "CLIP-I")]
    md = markdown_table(rows, cols)
    assert "| dreambooth | 0.668 | - |" in md and "a\\|b" in md
    text = text_table(rows, cols)
    assert text.splitlines()[0].split() == ["Method", "DINO", "CLIP-I"] and "0.668" in text
    write_csv(tmp_path / "cells.csv", rows, ["method", "dino", "clip_i"])
    assert (tmp_path / "cells.csv").read_text().splitlines() == ["method,dino,clip_i", "dreambooth,0.6681,", "a|b,0.5,0.8"]
