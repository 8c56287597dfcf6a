"""`dreamtune bench` on the shapes world: world subjects and prompts, the oracle scorer, no embedding models."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreamtune.errors import ConfigError
from dreamtune.evaluate import bench
from dreamtune.evaluate.bench import cell_config, load_spec, run_bench
from dreamtune.world import render
from dreamtune.world.bench import world_scorer
from dreamtune.world.subjects import get_subject, subject_prompts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORLD_SPEC = EXAMPLES / "bench-world.toml"


def _world_spec(tmp_path, **changes) -> dict:
    """The shipped world spec as a dict, its output moved into tmp_path."""
    data = tomllib.loads(WORLD_SPEC.read_text())
    data["output_dir"] = str(tmp_path / "out")
    data.update(changes)
    return data


def test_world_scorer_knows_the_subject_from_its_renders():
    subject = get_subject("striped_star")
    bench_subject = SimpleNamespace(name="star", world="striped_star", images_dir=None)
    own = world_scorer(subject.reference_images(), ["a photo of a sks star"] * subject.num_references, bench_subject)
    assert own["subject_fidelity"] == 1.0 and own["subject_present"] == 1.0 and own["joint"] == 1.0
    assert own["prompt_fidelity"] is None  # the plain prompt names nothing beyond the subject's class
    # Plain stars of every colour: the class is right, the subject's look is not there.
    plain = [render.render_pil(render.Scene("star", c, "black" if c != "black" else "white", "large", "center"))
             for c in render.COLOURS]
    scored = world_scorer(plain, ["a photo of a star"] * len(plain), bench_subject)
    assert scored["subject_fidelity"] < 0.5 and scored["subject_present"] == 0.0
    assert scored["subject_fidelity_low"] <= scored["subject_fidelity"] <= scored["subject_fidelity_high"]


def test_world_scorer_checks_prompts_per_image(tmp_path):
    from dreamtune.world.subjects import write_subject_images

    subject = get_subject("striped_star")
    # Not named as a world subject: the identity is read from its images, as for a user's own folder.
    write_subject_images(subject, tmp_path)
    bench_subject = SimpleNamespace(name="star", world=None, images_dir=tmp_path)
    scenes = subject.reference_scenes()
    images = subject.reference_images()
    right = [f"a photo of a sks star on a {s.background} background" for s in scenes]
    scored = world_scorer(images, right, bench_subject)
    assert scored["prompt_fidelity"] == scored["prompt_background"] == 1.0 and scored["joint"] == scored["subject_present"]
    wrong = [f"a photo of a sks star on a {subject.colour} background" for _ in scenes]
    assert world_scorer(images, wrong, bench_subject)["joint"] == 0.0
    elsewhere = world_scorer(get_subject("dashed_ring").reference_images(), right, bench_subject)
    assert elsewhere["subject_fidelity"] < scored["subject_fidelity"]


def test_world_spec_loads_with_the_worlds_settings(tmp_path):
    from dreamtune.world.demo import METHOD_SETTINGS, SAMPLING_STEPS

    spec = load_spec(_world_spec(tmp_path), base_dir=EXAMPLES)
    assert spec.steps == SAMPLING_STEPS
    assert [s.world for s in spec.subjects] == ["striped_star", "gen-0-1"]
    star = spec.subjects[0]
    assert star.class_noun == "star" and star.images_dir == tmp_path / "out" / "subjects" / "striped_star"
    assert [p.template for p in star.prompts] == [p.template for p in subject_prompts("striped_star")]
    assert spec.images_per_prompt == 8 and spec.scorers == ["world"] and spec.metrics["embeddings"] is False
    assert Path(spec.base_model).resolve() == (Path(bench.__file__).parent.parent / "world" / "model").resolve()
    assert list(spec.methods) == list(METHOD_SETTINGS)
    # Custom Diffusion's "world" class images resolve to the world's captioned scenes of the class.
    real = tmp_path / "out" / "world_class_images" / "star"
    real.mkdir(parents=True)
    (real / ".complete").write_text("")
    for label, settings in METHOD_SETTINGS.items():
        config = cell_config(spec, star, label, tmp_path / "run")
        for key, value in settings.items():
            got = config.concepts[0].identifier if key == "identifier" else getattr(config, key)
            assert got == value, (label, key)
        assert config.resolution == 32 and config.concepts[0].class_noun == "star"
    assert cell_config(spec, star, "custom_diffusion", tmp_path / "run").concepts[0].class_data_dir == str(real)


def test_world_spec_errors_name_the_key(tmp_path, subject_dir):
    def check(match, **changes):
        with pytest.raises(ConfigError, match=match):
            load_spec(_world_spec(tmp_path, **changes), base_dir=EXAMPLES)

    check("subject\\[0\\]: unknown subject 'no_such'", subject=[{"world": "no_such"}])
    check("drop 'class_noun'", subject=[{"world": "striped_star", "class_noun": "star"}])
    check("prompts = \"world\" is for shapes-world subjects",
          subject=[{"images": str(subject_dir), "class_noun": "toy"}], prompts="world")
    check("pres = true needs the embedding models", metrics={"embeddings": False, "pres": True})
    check("leaves nothing to measure", scorers=[])
    spec = load_spec(_world_spec(tmp_path, subject=[{"images": str(subject_dir), "class_noun": "star"}]), base_dir=EXAMPLES)
    with pytest.raises(ConfigError, match="class_data_dir = \"world\" is for shapes-world subjects"):
        cell_config(spec, spec.subjects[0], "custom_diffusion", tmp_path / "run")


def test_bench_documents_every_key():
    text = (EXAMPLES / "bench-dreambench.toml").read_text()
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.M))
    keys |= {"subject"} if "[[subject]]" in text else set()
    keys |= {name for name in ("train", "methods", "metrics") if re.search(rf"^#?\s*\[{name}[.\]]", text, flags=re.M)}
    assert not (bench.SPEC_KEYS | bench.METRIC_KEYS | set(bench.SUBJECT_KEYS)) - keys


def test_world_bench_runs_without_embedding_models(tmp_path, monkeypatch, capsys):
    from dreamtune.evaluate.runner import ScoringModels

    def no_models(*args, **kwargs):
        raise AssertionError("embeddings = false must not load DINO or CLIP")

    monkeypatch.setattr(ScoringModels, "load", no_models)
    fast = {"max_train_steps": 2, "with_prior_preservation": False}
    data = _world_spec(tmp_path, subject=[{"world": "striped_star"}], num_prompts=2, images_per_prompt=1, steps=2,
                       methods={"dreambooth": {**_world_spec(tmp_path)["methods"]["dreambooth"], **fast},
                                "textual_inversion": {**_world_spec(tmp_path)["methods"]["textual_inversion"], **fast}})
    spec = load_spec(data, base_dir=EXAMPLES)
    summary = run_bench(spec, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "subjects" / "striped_star").iterdir()) == [f"{i:02d}.png" for i in range(5)]
    cells = {c["method"]: c for c in summary["cells"]}
    assert list(cells) == ["dreambooth", "textual_inversion"]
    for cell in cells.values():
        assert cell["rendered"] == 2 and cell["dino"] is None and cell["clip_t"] is None
        for key in ("subject_fidelity", "subject_present", "joint"):
            assert 0.0 <= cell[f"world.{key}"] <= 1.0
            assert cell[f"world.{key}_low"] <= cell[f"world.{key}"] <= cell[f"world.{key}_high"]
    assert summary["real"] == [] and summary["embeddings"] is False
    assert [r["method"] for r in summary["table"]] == ["dreambooth", "textual_inversion"]
    printed = capsys.readouterr().out
    assert "Subject" in printed and "Joint" in printed and "DINO" in printed and "not computed" in printed
    assert "CLIP-I  " not in printed  # no embedding column in the table itself
    with open(out / "cells.csv") as f:
        header = next(csv.reader(f))
    assert "dino" not in header and "world.subject_fidelity_low" in header
    assert "not computed" in (out / "table.md").read_text()
    report = (out / "cells" / "striped_star" / "dreambooth" / "run" / "eval" / "report.md").read_text()
    assert "were not computed" in report
    # Run again: every cell is read back.
    again = run_bench(spec, progress=False, print_table=False)
    assert again["timing"]["computed_cells"] == 0 and again["cells"] == summary["cells"]


def test_tables_give_means_over_subjects_and_each_subjects_interval(tmp_path):
    spec = load_spec(_world_spec(tmp_path), base_dir=EXAMPLES)
    cells = [{"subject": s, "method": "dreambooth", "world.subject_fidelity": v, "world.subject_fidelity_low": v - 0.1,
              "world.subject_fidelity_high": v + 0.1} for s, v in (("striped_star", 0.8), ("gen-0-1", 0.4))]
    extra = bench.scorer_columns(spec, cells)
    assert extra[0] == ("world.subject_fidelity", "Subject")
    rows = bench.table_rows(cells, [], ["dreambooth"], [k for k, _ in extra])
    assert rows[0]["world.subject_fidelity"] == pytest.approx(0.6) and "world.subject_fidelity_low" not in rows[0]
    text, markdown = bench._tables(spec, rows, cells, extra)
    method_table, per_subject = text.split("Per subject")
    assert "0.60" in method_table and "[" not in method_table.split("\n", 2)[2]
    assert "0.80 [0.70,0.90]" in per_subject and "0.40 [0.30,0.50]" in per_subject
    assert "0.80 [0.70,0.90]" in markdown and "not computed" in text
