"""`dreamtune world compare`: every method on the same shapes-world subjects, scored by the oracle.

For each subject: the base model, DreamBooth with and without prior preservation, Custom Diffusion,
Textual Inversion and LoRA, each trained with the world's settings (`demo.METHOD_SETTINGS`, chosen on
the shipped subjects only). For the first two subjects also Custom Diffusion on both concepts at once
(joint training, `<new1>` and `<new2>`) and the closed-form merge of the two single-concept runs.
Custom Diffusion regularises with real images of the class: rendered world scenes of that class with
their captions, the world's counterpart of the paper's retrieved LAION images.

Every cell (subject x model) writes `cells/<subject>/<model>.json` when it is scored, so a compare
started again skips finished cells. Cells are independent, so worker processes (one per core by
default, `jobs`) train and score them side by side; the merge waits for the two single runs it combines. The table (`table.txt`, `compare.json`) gives every figure with
its bootstrap confidence interval.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..errors import DreamtuneError
from ..io import write_json, write_text
from . import MODEL_DIR, render
from .subjects import Subject, get_subject, write_subject_images

# Row label -> (method, TrainConfig overrides).
SINGLE_MODELS: dict[str, tuple[str, dict]] = {
    "dreambooth": ("dreambooth", {}),
    "dreambooth, no prior": ("dreambooth", {"with_prior_preservation": False}),
    "custom_diffusion": ("custom_diffusion", {}),
    "textual_inversion": ("textual_inversion", {}),
    "lora": ("lora", {}),
}


def write_real_class_images(cls: str, out_dir: Path, count: int | None = None, seed: int = 0,
                            base_model: str | Path | None = None) -> Path:
    """Write `count` world scenes of a class with their captions (.txt beside each PNG); reuse a finished folder.

    `count` defaults to the world's Custom Diffusion setting (`demo.METHOD_SETTINGS`: the paper's 200).

    These are the world's "real images" of the class: drawn, not generated, half of them patterned,
    none of a reserved (subject) combination, captioned as `base_model`'s pretraining data was (its
    rare words: named instances among them, or noise; default: the shipped model's).
    """
    import numpy as np

    from ..io import save_image
    from .demo import METHOD_SETTINGS

    count = count or METHOD_SETTINGS["custom_diffusion"]["num_class_images"]
    done = out_dir / ".complete"
    if done.exists():
        return out_dir
    from .pretrain import pretrained_settings

    rare_words = pretrained_settings(base_model or MODEL_DIR).rare_words
    named_share = render.NAMED_SHARE if rare_words == "instances" else 0.0
    rng = np.random.default_rng([seed, 4242, render.CLASSES.index(cls)])
    written = 0
    while written < count:
        scene = render.random_scene(rng, pattern_share=render.PATTERN_SHARE, named_share=named_share)
        if scene.cls != cls:
            continue
        path = out_dir / f"{written:03d}.png"
        save_image(render.render_pil(scene), path)
        write_text(path.with_suffix(".txt"), render.caption(scene, rng, rare_words) + "\n")
        written += 1
    write_text(done, "")
    return out_dir


def _identifier(method: str, index: int) -> str:
    from .demo import METHOD_SETTINGS

    identifier = METHOD_SETTINGS[method]["identifier"]
    # Each subject's new token differs, so that two Custom Diffusion runs can be merged.
    return identifier.replace("1", str(index + 1)) if identifier.startswith("<") else identifier


def _config(subjects: list[Subject], method: str, overrides: dict, out: Path, run_dir: Path, *, steps, seed: int,
            base_model: Path):
    from .demo import train_config

    config = None
    concepts = []
    for i, subject in enumerate(subjects):
        class_dir = out / "class_images" / subject.class_noun
        if method == "custom_diffusion":
            class_dir = write_real_class_images(subject.class_noun, out / "real_images" / subject.class_noun, seed=seed,
                                                base_model=base_model)
        cfg = train_config(subject, method, out / "subjects" / subject.name, class_dir, run_dir, steps=steps,
                           seed=seed, base_model=base_model, **overrides)
        concept = cfg.concepts[0]
        concept.identifier = _identifier(method, i)
        concepts.append(concept)
        config = config or cfg
    config.concepts = concepts
    return config


def _train(config, run_dir: Path, progress: bool) -> tuple[Path, float]:
    from ..training import train

    artifact = run_dir / "artifact"
    if (artifact / "dreamtune.json").exists() or (artifact / "model_index.json").exists():
        return artifact, 0.0
    started = time.monotonic()
    result = train(config, overwrite=True, progress=progress)
    return Path(result.artifact_dir), time.monotonic() - started


def _score(cell: Path, name: str, pipe, subject: Subject, identifier: str, *, seed: int, images_per_prompt: int,
           train_seconds: float, progress: bool) -> dict:
    from .demo import score_model

    if cell.exists():
        return json.loads(cell.read_text())
    scores, _ = score_model(name, pipe, subject, identifier, seed=seed, images_per_prompt=images_per_prompt,
                            progress=progress)
    scores.train_seconds = train_seconds
    row = {"subject": subject.name, **dataclasses.asdict(scores)}
    write_json(cell, row)
    return row


def _single_job(subject: str, index: int, label: str, *, out: Path, base_model: Path, steps, seed: int,
                images_per_prompt: int, progress: bool, threads: int | None = None) -> list[dict]:
    """One cell: the base model scored on a subject, or a method trained on it and scored."""
    from ..pipeline import load_pipeline
    from .demo import _quiet_libraries, use_threads

    use_threads(threads)
    _quiet_libraries()
    chosen = get_subject(subject)
    cells = out / "cells" / chosen.name
    if label == "base model":
        cell = cells / "base model.json"
        if cell.exists():
            return [json.loads(cell.read_text())]
        return [_score(cell, label, load_pipeline(str(base_model)), chosen, "sks", seed=seed,
                       images_per_prompt=images_per_prompt, train_seconds=0.0, progress=progress)]
    method, overrides = SINGLE_MODELS[label]
    cell = cells / f"{label}.json"
    if cell.exists():
        return [json.loads(cell.read_text())]
    run_dir = out / "runs" / chosen.name / label.replace(", ", "-").replace(" ", "-")
    config = _config([chosen], method, overrides, out, run_dir, steps=steps, seed=seed, base_model=base_model)
    config.concepts[0].identifier = _identifier(method, index)
    artifact, seconds = _train(config, run_dir, progress)
    return [_score(cell, label, load_pipeline(str(base_model), artifact), chosen, config.concepts[0].identifier,
                   seed=seed, images_per_prompt=images_per_prompt, train_seconds=seconds, progress=progress)]


def run_compare(subjects: list[str], *, models: list[str] | None = None, output_dir: str | Path = "dreamtune-compare",
                seed: int = 0, images_per_prompt: int = 8, steps: int | None = None, pairs: bool = True,
                progress: bool = True, quiet: bool = False, model: str | Path | None = None,
                jobs: int | None = None) -> list[dict]:
    """Train and score every model on every subject; returns one row per (subject, model) and writes the table.

    `models` picks from "base model", SINGLE_MODELS and (with `pairs`) the two-concept rows; an
    existing output folder is resumed, finished cells are kept. `model` is another shapes-world
    pipeline folder (default: the shipped one). `jobs` worker processes train and score cells side by
    side (default: one per core); with 1 everything runs in this process, with progress bars.
    """
    from .demo import _quiet_libraries, default_jobs

    base_model = Path(model).expanduser() if model else MODEL_DIR
    chosen = [get_subject(name) for name in subjects]
    if not chosen:
        raise DreamtuneError("world compare: name at least one subject (--subjects)")
    wanted = models or ["base model", *SINGLE_MODELS]
    unknown = [m for m in wanted if m != "base model" and m not in SINGLE_MODELS]
    if unknown:
        raise DreamtuneError(f"world compare: unknown model '{unknown[0]}'; choose from: base model, "
                             f"{', '.join(SINGLE_MODELS)}")
    out = Path(output_dir).expanduser()
    say = (lambda *a: None) if quiet else print
    _quiet_libraries()
    for subject in chosen:
        write_subject_images(subject, out / "subjects" / subject.name)
        if "custom_diffusion" in wanted:  # shared by the single, joint and merged runs: written once, here
            write_real_class_images(subject.class_noun, out / "real_images" / subject.class_noun, seed=seed,
                                    base_model=base_model)
    common = {"out": out, "base_model": base_model, "steps": steps, "seed": seed,
              "images_per_prompt": images_per_prompt}
    cells = [(subject.name, index, label) for index, subject in enumerate(chosen)
             for label in wanted if label == "base model" or label in SINGLE_MODELS]
    pair = chosen[:2] if pairs and len(chosen) >= 2 and "custom_diffusion" in wanted else []
    units = len(cells) + (2 if pair else 0)
    jobs = default_jobs(units, jobs)
    results: dict[tuple, list[dict]] = {}
    if jobs == 1:
        for name, index, label in cells:
            say(f"{name}: {label}")
            results[(name, label)] = _single_job(name, index, label, progress=progress, **common)
        if pair:
            say(f"{pair[0].name}+{pair[1].name}: custom_diffusion joint and merged")
            results[("pair", "joint")] = _pair_job([s.name for s in pair], "joint", progress=progress, **common)
            results[("pair", "merged")] = _pair_job([s.name for s in pair], "merged", progress=progress, **common)
    else:
        results = _run_compare_jobs(cells, [s.name for s in pair], jobs, common, say)
    rows = [row for name, _, label in cells for row in results[(name, label)]]
    if pair:
        rows += results[("pair", "joint")] + results[("pair", "merged")]
    table = format_compare(rows)
    write_text(out / "table.txt", table + "\n")
    write_json(out / "compare.json", {"subjects": [s.name for s in chosen], "seed": seed,
                                      "images_per_prompt": images_per_prompt, "rows": rows})
    say("")
    say(table)
    return rows


def _run_compare_jobs(cells: list[tuple], pair: list[str], jobs: int, common: dict, say) -> dict[tuple, list[dict]]:
    """The cells in `jobs` worker processes; the merge starts once both single Custom Diffusion runs are done."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from .demo import worker_pool

    started = time.monotonic()
    results: dict[tuple, list[dict]] = {}
    singles_for_merge = {(name, "custom_diffusion") for name in pair}
    with worker_pool(jobs, f"{len(cells) + (2 if pair else 0)} cells", say) as (pool, threads):
        pending = {pool.submit(_single_job, name, index, label, progress=False, threads=threads, **common): (name, label)
                   for name, index, label in cells}
        if pair:
            pending[pool.submit(_pair_job, pair, "joint", progress=False, threads=threads, **common)] = ("pair", "joint")
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                results[key] = future.result()
                say(f"  {' '.join(key)} ({time.monotonic() - started:.0f} s)")
                if pair and key in singles_for_merge and singles_for_merge <= results.keys():
                    pending[pool.submit(_pair_job, pair, "merged", progress=False, threads=threads,
                                        **common)] = ("pair", "merged")
    return results


def _pair_job(names: list[str], which: str, *, out: Path, base_model: Path, seed: int, steps, images_per_prompt: int,
              progress: bool, threads: int | None = None) -> list[dict]:
    """Custom Diffusion on two subjects: trained jointly (`which` "joint"), or the merge of the two single runs."""
    from ..merge import merge
    from ..pipeline import load_pipeline
    from .demo import _quiet_libraries, use_threads

    use_threads(threads)
    _quiet_libraries()
    pair = [get_subject(name) for name in names]
    names_dir = out / "runs" / "+".join(names)
    if which == "joint":
        label, run_dir = "custom_diffusion joint", names_dir / "custom_diffusion-joint"
        config = _config(pair, *SINGLE_MODELS["custom_diffusion"], out, run_dir, steps=steps, seed=seed,
                         base_model=base_model)
        # Joint training sees both concepts' images: as many steps as the two single runs together.
        config.max_train_steps *= 2
        if all((out / "cells" / s.name / f"{label}.json").exists() for s in pair):
            artifact, seconds = run_dir / "artifact", 0.0
        else:
            artifact, seconds = _train(config, run_dir, progress)
    else:
        label, artifact, seconds = "custom_diffusion merged", names_dir / "custom_diffusion-merged", 0.0
        if not (artifact / "dreamtune.json").exists():
            singles = [out / "runs" / s.name / "custom_diffusion" for s in pair]
            missing = [str(s) for s in singles if not (s / "artifact").exists()]
            if missing:
                raise DreamtuneError(f"world compare: the merge needs the single-concept runs first: {', '.join(missing)}")
            captions = [line.strip() for s in pair
                        for line in (p.read_text().strip() for p in sorted((out / "real_images" / s.class_noun).glob("*.txt")))]
            # Both classes' captions regularise (the default would keep the first 200: one class's).
            merge([s / "artifact" for s in singles], captions, artifact, str(base_model), num_reg_captions=len(captions))
    rows = []
    pipe = None
    for index, subject in enumerate(pair):
        cell = out / "cells" / subject.name / f"{label}.json"
        if cell.exists():
            rows.append(json.loads(cell.read_text()))
            continue
        pipe = pipe or load_pipeline(str(base_model), artifact)
        rows.append(_score(cell, label, pipe, subject, f"<new{index + 1}>", seed=seed,
                           images_per_prompt=images_per_prompt, train_seconds=seconds, progress=progress))
    return rows


def format_compare(rows: list[dict]) -> str:
    """One table: a block per subject, a line per model, with the demo's columns."""
    from .demo import ModelScores, format_table

    fields = {f.name for f in dataclasses.fields(ModelScores)}
    blocks = []
    for subject in dict.fromkeys(r["subject"] for r in rows):
        scores = [ModelScores(**{k: v for k, v in r.items() if k in fields}) for r in rows if r["subject"] == subject]
        blocks.append(f"subject {subject}\n{format_table(scores)}")
    return "\n\n".join(blocks)
