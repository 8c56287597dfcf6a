"""`dreamtune bench` on a google/dreambooth-layout dataset of two made-up subjects and the tiny model."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image, ImageDraw

from dreamtune.errors import ConfigError
from dreamtune.evaluate.bench import load_spec, register_scorer, run_bench
from dreamtune.evaluate.tiny_models import save_tiny_clip, save_tiny_dino

PROMPTS_FILE = """Classes

subject_name,class
blocky,toy
rex,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} on a shelf'.format(unique_token, class_token),
'a {0} {1} in a garden'.format(unique_token, class_token),
'a blue {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} asleep on a sofa'.format(unique_token, class_token),
'a {0} {1} wearing a scarf'.format(unique_token, class_token)
]
"""


def _dataset(root):
    for s, name in enumerate(("blocky", "rex")):
        folder = root / "dataset" / name
        folder.mkdir(parents=True)
        for i in range(3):
            image = Image.new("RGB", (40, 40), (60 * s + 20 * i, 90, 160))
            ImageDraw.Draw(image).rectangle([5 + i, 8, 25 + s * 5, 30], fill=(220, 40 * s, 30))
            image.save(folder / f"{i:02d}.jpg")
    (root / "dataset" / "prompts_and_classes.txt").write_text(PROMPTS_FILE)


SPEC = """
output_dir = "out"
pretrained_model_name_or_path = "{model}"
dataset = "dataset"
num_prompts = 2
images_per_prompt = 2
steps = 2
scorers = ["probe"]

[train]
resolution = 32
max_train_steps = 1
train_batch_size = 1
learning_rate = 1e-3
validation_steps = 0
checkpointing_steps = 0
num_validation_images = 1
validation_inference_steps = 1

[methods.dreambooth]

[metrics]
dino_model = "dino"
clip_model = "clip"
"""


@pytest.fixture
def bench_dir(tmp_path, tiny_model_dir):
    _dataset(tmp_path)
    save_tiny_dino(tmp_path / "dino")
    save_tiny_clip(tmp_path / "clip")
    (tmp_path / "bench.toml").write_text(SPEC.format(model=tiny_model_dir))
    return tmp_path


def test_bench_runs_resumes_and_reports(bench_dir, capsys):
    calls = []
    state = {"fail_on": "rex"}

    def probe(images, prompts, subject):
        calls.append(subject.name)
        assert len(images) == len(prompts) == 4 and all(subject.class_noun in p for p in prompts)
        if subject.name == state["fail_on"]:
            raise RuntimeError("interrupted")
        return {"images": len(images), "first_prompt_words": len(prompts[0].split())}

    register_scorer("probe", probe)
    spec = bench_dir / "bench.toml"
    with pytest.raises(RuntimeError, match="interrupted"):
        run_bench(spec, progress=False)
    out = bench_dir / "out"
    first_cell = out / "cells" / "blocky" / "dreambooth" / "result.json"
    assert first_cell.is_file() and not (out / "cells" / "rex" / "dreambooth" / "result.json").exists()
    stamp = first_cell.stat().st_mtime_ns

    # Started again: the finished cell is read back; the broken one is neither retrained nor re-rendered.
    state["fail_on"] = None
    summary = run_bench(spec, progress=False)
    assert summary["timing"]["computed_cells"] == 1 and summary["timing"]["skipped_cells"] == 1
    assert first_cell.stat().st_mtime_ns == stamp
    rex = next(c for c in summary["cells"] if c["subject"] == "rex")
    assert rex["train_s"] == 0.0 and rex["rendered"] == 0 and rex["live"] is True
    assert rex["probe.images"] == 4 and rex["probe.first_prompt_words"] == len("a sks dog asleep on a sofa".split())

    # Table 1: Real images first, then each method averaged over subjects.
    table = {r["method"]: r for r in summary["table"]}
    assert list(table) == ["Real images", "dreambooth"]
    cells = summary["cells"]
    for key in ("dino", "clip_i", "clip_t"):
        assert table["dreambooth"][key] == pytest.approx(sum(c[key] for c in cells) / 2)
    real = [json.loads((out / "real" / f"{s}.json").read_text()) for s in ("blocky", "rex")]
    assert table["Real images"]["dino"] == pytest.approx((real[0]["dino"] + real[1]["dino"]) / 2)
    assert table["Real images"]["clip_t"] is None
    printed = capsys.readouterr().out
    assert "Real images" in printed and "CLIP-T" in printed
    with open(out / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["blocky", "rex"] and rows[1]["probe.images"] == "4"
    assert "| dreambooth |" in (out / "table.md").read_text()
    # Each cell's eval report sits in its run folder.
    assert (out / "cells" / "rex" / "dreambooth" / "run" / "eval" / "report.html").is_file()

    # A third time through the command line: nothing left to compute.
    from dreamtune.cli import main

    calls.clear()
    assert main(["bench", str(spec), "--quiet"]) == 0
    assert calls == [] and "dreambooth" in capsys.readouterr().out


def test_spec_errors_name_the_key(bench_dir):
    spec = (bench_dir / "bench.toml").read_text()
    register_scorer("probe", lambda images, prompts, subject: {})

    def check(text, match):
        (bench_dir / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_spec(bench_dir / "bad.toml")

    check(spec.replace("num_prompts", "num_promps"), "unknown key 'num_promps'")
    check(spec.replace('dataset = "dataset"', 'dataset = "dataset"\nsubjects = ["rexx"]'), "'rexx'.*Did you mean 'rex'")
    check(spec.replace("[methods.dreambooth]", "[methods.dreambooth]\nlearning_rat = 1"), "unknown option 'learning_rat'")
    check(spec.replace('scorers = ["probe"]', 'scorers = ["nobody"]'), "unknown scorer 'nobody'")
    check(spec.replace('dataset = "dataset"', ""), "no subjects")
    loaded = load_spec(bench_dir / "bench.toml")
    assert [s.name for s in loaded.subjects] == ["blocky", "rex"]
    assert [p.template for p in loaded.subjects[0].prompts] == ["a {0} {1} on a shelf", "a blue {0} {1}"]


def test_bench_on_an_sdxl_base_model(tmp_path, tiny_sdxl_model_dir):
    """The same spec with an SDXL base: the cell trains on SDXL, renders with its pipeline and is scored."""
    from PIL import Image

    _dataset(tmp_path)
    save_tiny_dino(tmp_path / "dino")
    save_tiny_clip(tmp_path / "clip")
    spec = (SPEC.format(model=tiny_sdxl_model_dir)
            .replace('dataset = "dataset"', 'dataset = "dataset"\nsubjects = ["rex"]')
            .replace("num_prompts = 2", "num_prompts = 1").replace('scorers = ["probe"]', "scorers = []")
            .replace("[methods.dreambooth]", "[methods.lora]"))
    (tmp_path / "bench.toml").write_text(spec)
    summary = run_bench(tmp_path / "bench.toml", progress=False)
    [cell] = summary["cells"]
    assert cell["method"] == "lora" and cell["rendered"] == 2
    assert all(-1 <= cell[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
    run = tmp_path / "out" / "cells" / "rex" / "lora" / "run"
    assert json.loads((run / "artifact" / "dreamtune.json").read_text())["family"] == "sdxl"
    rendered = list((run / "eval" / "images").rglob("*.png"))
    assert len(rendered) == 2 and {Image.open(p).size for p in rendered} == {(32, 32)}
    assert [r["method"] for r in summary["table"]] == ["Real images", "lora"]
