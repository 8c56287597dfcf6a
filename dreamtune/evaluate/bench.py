"""`dreamtune bench SPEC.toml`: the DreamBench protocol over many subjects and methods.

Each cell is one subject x one method: train it (`dreamtune.training.train`), render the
subject's prompts (25 x 4 images by default), score them. A cell's results are written atomically
to `<output_dir>/cells/<subject>/<method>/result.json` when it is finished, so an interrupted bench
started again skips finished cells (and resumes a half-trained one from its last checkpoint, and
reuses images already rendered). At the end it prints DreamBooth's Table 1 layout (method x DINO /
CLIP-I / CLIP-T, means over subjects, with a "Real images" row) and writes `table.md`,
`cells.csv` (every cell) and `summary.json`.

A spec is a TOML file (paths relative to it). examples/bench-dreambench.toml shows and explains every
key; examples/bench-world.toml runs the shapes world offline, scored by its oracle. In short:

    output_dir = "bench"                          # default: <spec name>-bench beside the spec
    pretrained_model_name_or_path = "path/or/hub-id"
    dataset = "dreambooth/dataset"                # google/dreambooth layout: <subject>/*.jpg + prompts_and_classes.txt
    subjects = ["dog", "backpack"]                # optional: a subset of the dataset's subjects
    prompts = "dataset"                           # "dataset", "dreambench" (built-in), "world" or a file
    num_prompts = 25                              # fewer for a quick run (spread over the list)
    images_per_prompt = 4
    seed = 0
    steps = 50                                    # sampling steps (default: the run's validation steps)
    guidance = 7.5
    sample_batch_size = 8                         # images rendered per batch
    real_min_images = 2                           # real images a subject needs for its "Real images" row
    scorers = ["world", "my_package.module:score"]  # extra scorers, see `register_scorer`

    [train]                                       # options of every cell (any TrainConfig option)
    resolution = 512

    [methods.dreambooth]                          # one table per method; its name labels the row
    with_prior_preservation = true
    [methods.custom_diffusion]
    identifier = "<new1>"                         # concept options are accepted here too

    [[subject]]                                   # subjects outside a dataset
    name = "teapot"
    images = "photos/teapot"
    class_noun = "teapot"
    [[subject]]
    world = "striped_star"                        # a shapes-world subject: images, class and prompts come with it

    [metrics]
    embeddings = true                             # false: no DINO/CLIP at all; the scorers' figures only
    dino_model = "facebook/dino-vits16"
    clip_model = "openai/clip-vit-base-patch32"
    offline = false
    pres = false
    kid = false
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import write_json, write_text
from .prompts import (
    PROMPT_FILE_NAME,
    EvalPrompt,
    builtin_prompts,
    is_live,
    parse_dreambench_file,
    read_prompt_file,
)
from .report import markdown_table, text_table, write_csv

logger = logging.getLogger(__name__)

#: A scorer gets a cell's images (PIL), the prompt of each image (identifier filled in) and the
#: subject, and returns named numbers, which land in the cell's results and the CSV as "<scorer>.<key>".
Scorer = Callable[[list, list, "BenchSubject"], dict]
SCORERS: dict[str, Scorer] = {}
TABLE_METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
SPEC_KEYS = {"output_dir", "pretrained_model_name_or_path", "dataset", "subjects", "subject", "prompts", "num_prompts",
             "images_per_prompt", "seed", "steps", "guidance", "scorers", "train", "methods", "metrics", "real_min_images",
             "sample_batch_size"}
METRIC_KEYS = {"embeddings", "dino_model", "clip_model", "offline", "device", "pres", "kid", "kid_features", "kid_model",
               "batch_size"}
# Scorers that ship with dreamtune, imported only when a spec names them (the library does not import the world).
BUILTIN_SCORERS = {"world": "dreamtune.world.bench:world_scorer"}
SUBJECT_KEYS = ("name", "images", "class_noun", "live", "prompts", "world")


def register_scorer(name: str, fn: Scorer | None = None):
    """Register an extra scorer under `name` (usable as a decorator); a spec lists it in `scorers`.

    A scorer is `fn(images, prompts, subject) -> dict[str, float]`: a cell's images in prompt order
    (`images_per_prompt` consecutive images per prompt). A key "x" with "x_low"/"x_high" beside it is
    printed as a figure with its interval. The table shows every key but those, unless the function
    has a `table_columns` attribute ({key: title}). Specs may also name one as
    'package.module:function' without registering it.
    """
    def add(f: Scorer) -> Scorer:
        SCORERS[name] = f
        return f

    return add(fn) if fn is not None else add


def get_scorer(name: str) -> Scorer:
    """A registered scorer, or one given as 'package.module:function'."""
    if name in SCORERS:
        return SCORERS[name]
    if name in BUILTIN_SCORERS or ":" in name:
        module_name, attr = BUILTIN_SCORERS.get(name, name).split(":", 1)
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"scorers: cannot import '{name}' ({e}).") from None
    known = ", ".join(sorted({*SCORERS, *BUILTIN_SCORERS}))
    raise ConfigError(f"scorers: unknown scorer '{name}' ({known}); name one as 'package.module:function'.")


@dataclass
class BenchSubject:
    """One subject of the benchmark: its real images, class, and evaluation prompts."""

    name: str
    class_noun: str
    images_dir: Path
    live: bool
    prompts: list[EvalPrompt] = field(default_factory=list)
    #: A shapes-world subject's name: its reference images are written into images_dir when the bench runs.
    world: str | None = None


@dataclass
class BenchSpec:
    """A parsed bench spec (see the module docstring for the TOML)."""

    path: Path | None
    output_dir: Path
    base_model: str
    subjects: list[BenchSubject]
    methods: dict[str, dict]
    train: dict = field(default_factory=dict)
    images_per_prompt: int = 4
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    scorers: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    real_min_images: int = 2
    sample_batch_size: int = 8


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _spread(items: list, n: int | None) -> list:
    if not n or n >= len(items):
        return items
    return [items[round(i * len(items) / n)] for i in range(n)]


def _subject_prompts(source: str, live: bool, dataset_file, base: Path, where: str, world: str | None = None) -> list[EvalPrompt]:
    if source == "world":
        if not world:
            raise ConfigError(f"{where}: prompts = \"world\" is for shapes-world subjects ([[subject]] world = NAME).")
        from ..world.bench import eval_prompts

        return eval_prompts(world)
    if source == "dataset":
        if dataset_file is None:
            return builtin_prompts(live)
        prompts = dataset_file.prompts_for(live)
        if not prompts:
            raise ConfigError(f"{where}: the dataset's {PROMPT_FILE_NAME} has no {'live subject' if live else 'object'} prompt list.")
        return prompts
    if source == "dreambench":
        return builtin_prompts(live)
    return read_prompt_file(_resolve(base, source), live=live)


def load_spec(spec: str | Path | dict, base_dir: str | Path | None = None) -> BenchSpec:
    """Read and check a bench spec (a TOML file or its parsed dict)."""
    from ..config import ConceptConfig, TrainConfig, is_option
    from ..data.images import list_images

    if isinstance(spec, dict):
        data, path = dict(spec), None
        base = Path(base_dir or ".").resolve()
        where = "bench spec"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: bench spec not found.")
        try:
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e}).") from None
        base = Path(base_dir).resolve() if base_dir else path.resolve().parent
        where = str(path)
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(SPEC_KEYS))}.")
    base_model = str(data.get("pretrained_model_name_or_path") or data.get("train", {}).get("pretrained_model_name_or_path", ""))
    if not base_model:
        raise ConfigError(f"{where}: set pretrained_model_name_or_path (the base model every method starts from).")
    if base_model.startswith((".", "~")) or Path(base_model).suffix:
        base_model = str(_resolve(base, base_model))
    elif not Path(base_model).is_absolute() and (base / base_model).exists():
        base_model = str(base / base_model)
    output_dir = _resolve(base, str(data.get("output_dir") or f"{path.stem if path else 'dreamtune'}-bench"))

    # Subjects: a google/dreambooth dataset folder and/or [[subject]] tables.
    dataset_file = None
    subjects: list[BenchSubject] = []
    prompt_source = str(data.get("prompts", "dataset"))
    if data.get("dataset"):
        dataset = _resolve(base, str(data["dataset"]))
        if not dataset.is_dir():
            raise ConfigError(f"{where}: dataset '{dataset}' is not a folder.")
        for candidate in (dataset / PROMPT_FILE_NAME, dataset.parent / PROMPT_FILE_NAME):
            if candidate.is_file():
                dataset_file = parse_dreambench_file(candidate)
                break
        if dataset_file is None:
            raise ConfigError(f"{where}: no {PROMPT_FILE_NAME} in '{dataset}' (it names each subject's class); "
                              "use the google/dreambooth dataset folder or [[subject]] tables.")
        wanted = data.get("subjects") or [n for n in dataset_file.classes if (dataset / n).is_dir()]
        for name in wanted:
            if name not in dataset_file.classes:
                import difflib

                close = difflib.get_close_matches(name, list(dataset_file.classes), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{where}: subject '{name}' is not in {PROMPT_FILE_NAME}.{hint}")
            class_noun = dataset_file.classes[name]
            live = is_live(class_noun)
            list_images(dataset / name, what=f"{where}: subject '{name}'")
            subjects.append(BenchSubject(name, class_noun, dataset / name, live,
                                         _subject_prompts(prompt_source, live, dataset_file, base, where)))
    elif data.get("subjects"):
        raise ConfigError(f"{where}: 'subjects' picks from a dataset; set 'dataset' or describe each one in a [[subject]] table.")
    for i, entry in enumerate(data.get("subject", [])):
        w = f"{where}: subject[{i}]"
        extra = sorted(set(entry) - set(SUBJECT_KEYS))
        if extra:
            raise ConfigError(f"{w}: unknown key '{extra[0]}' (use {', '.join(SUBJECT_KEYS)}).")
        if entry.get("world"):
            subjects.append(_world_subject(entry, data, base, output_dir, w))
            continue
        if not entry.get("images") or not entry.get("class_noun"):
            raise ConfigError(f"{w}: needs 'images' (a folder) and 'class_noun'.")
        images_dir = _resolve(base, str(entry["images"]))
        list_images(images_dir, what=f"{w}: images")
        live = bool(entry.get("live", is_live(entry["class_noun"])))
        name = str(entry.get("name") or images_dir.name)
        prompts = _subject_prompts(str(entry.get("prompts", prompt_source)), live, dataset_file, base, w)
        subjects.append(BenchSubject(name, str(entry["class_noun"]), images_dir, live, prompts))
    if not subjects:
        raise ConfigError(f"{where}: no subjects; set 'dataset' (google/dreambooth layout) or add [[subject]] tables.")
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two subjects are named '{next(n for n in names if names.count(n) > 1)}'; give each a distinct name.")
    num_prompts = data.get("num_prompts")
    for s in subjects:
        s.prompts = _spread(s.prompts, int(num_prompts) if num_prompts else None)

    # Methods: [methods.<label>] tables (or a plain list of method names); their options are checked now.
    methods = data.get("methods") or {TrainConfig.method: {}}
    if isinstance(methods, list):
        methods = {str(m): {} for m in methods}
    concept_fields = {f.name for f in dataclasses.fields(ConceptConfig)} - {"instance_data_dir", "class_noun"}
    common = dict(data.get("train", {}))
    for label, options in {"train": common, **{f"methods.{k}": v for k, v in methods.items()}}.items():
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: [{label}] must be a table of options.")
        for key in options:
            if key in ("concepts", "output_dir") or not (is_option(key) or key in concept_fields):
                raise ConfigError(f"{where}: [{label}] unknown option '{key}' (any training or concept option except output_dir/concepts).")
    for label in methods:
        if "/" in label or label.startswith("."):
            raise ConfigError(f"{where}: method label '{label}' must be a plain name.")
    metrics = dict(data.get("metrics", {}))
    bad = sorted(set(metrics) - METRIC_KEYS)
    if bad:
        raise ConfigError(f"{where}: [metrics] unknown key '{bad[0]}'; known: {', '.join(sorted(METRIC_KEYS))}.")
    if not metrics.get("embeddings", True):
        on = [k for k in ("pres", "kid") if metrics.get(k)]
        if on:
            raise ConfigError(f"{where}: [metrics] {on[0]} = true needs the embedding models; set embeddings = true or {on[0]} = false.")
        if not data.get("scorers"):
            raise ConfigError(f"{where}: [metrics] embeddings = false leaves nothing to measure; name scorers "
                              "(scorers = [\"world\"] for shapes-world subjects) or set embeddings = true.")
    for key in ("dino_model", "clip_model", "kid_model"):
        value = metrics.get(key)
        if value and (str(value).startswith((".", "~")) or (base / str(value)).exists()):
            metrics[key] = str(_resolve(base, str(value)))
    scorers = [str(s) for s in data.get("scorers", [])]
    for name in scorers:
        get_scorer(name)
    images_per_prompt = int(data.get("images_per_prompt", 4))
    if images_per_prompt < 1:
        raise ConfigError(f"{where}: images_per_prompt must be at least 1.")
    return BenchSpec(path=path, output_dir=output_dir, base_model=base_model, subjects=subjects, methods=methods,
                     train=common, images_per_prompt=images_per_prompt, seed=int(data.get("seed", 0)),
                     steps=int(data["steps"]) if data.get("steps") else None,
                     guidance=float(data["guidance"]) if data.get("guidance") is not None else None,
                     scorers=scorers, metrics=metrics, real_min_images=int(data.get("real_min_images", 2)),
                     sample_batch_size=int(data.get("sample_batch_size", 8)))


def _world_subject(entry: dict, data: dict, base: Path, output_dir: Path, where: str) -> BenchSubject:
    """A [[subject]] table with `world = NAME`: the world writes its images; its class and prompts come with it."""
    from ..world.bench import world_subject

    name = str(entry["world"])
    clash = [k for k in ("images", "class_noun", "live") if k in entry]
    if clash:
        raise ConfigError(f"{where}: a world subject brings its own images and class; drop '{clash[0]}'.")
    subject = world_subject(name, where)
    label = str(entry.get("name") or name)
    source = str(entry.get("prompts") or data.get("prompts") or "world")
    prompts = _subject_prompts(source, False, None, base, where, world=name)
    return BenchSubject(label, subject.class_noun, output_dir / "subjects" / label, False, prompts, world=name)


def prepare_subjects(spec: BenchSpec) -> None:
    """Write the world subjects' reference images into the output folder (kept when already there)."""
    for subject in spec.subjects:
        if subject.world:
            from ..world.bench import write_references

            write_references(subject.world, subject.images_dir)


def cell_config(spec: BenchSpec, subject: BenchSubject, label: str, run_dir: Path):
    """The TrainConfig of one cell: [train], then the method's table, then the subject.

    `class_data_dir = "world"` gives a world subject's cell the world's real images of its class
    (captioned scenes, as `dreamtune world compare` gives Custom Diffusion), written once per class.
    """
    from ..config import ConceptConfig, TrainConfig, config_from_dict
    from ..methods import get_method, method_names

    concept_keys = {f.name for f in dataclasses.fields(ConceptConfig)}
    options = {**spec.train, **spec.methods[label]}
    method = str(options.get("method", label if label in method_names() else TrainConfig.method))
    concept = {"instance_data_dir": str(subject.images_dir), "class_noun": subject.class_noun,
               "identifier": "<new1>" if get_method(method).new_tokens else "sks"}
    concept.update({k: v for k, v in options.items() if k in concept_keys})
    values = {k: v for k, v in options.items() if k not in concept_keys}
    values.update(pretrained_model_name_or_path=spec.base_model, method=method, output_dir=str(run_dir), concepts=[concept])
    values.setdefault("seed", spec.seed)
    config = config_from_dict(values, where=f"{spec.path or 'bench spec'}: methods.{label}")
    concept = config.concepts[0]
    if concept.class_data_dir == "world":
        if not subject.world:
            raise ConfigError(f"{spec.path or 'bench spec'}: methods.{label}: class_data_dir = \"world\" is for "
                              f"shapes-world subjects; '{subject.name}' is not one.")
        concept.class_data_dir = ""  # without prior preservation no class image is read: none is written
        if config.with_prior_preservation:
            from ..world.bench import real_class_images

            folder = spec.output_dir / "world_class_images" / subject.class_noun
            concept.class_data_dir = str(real_class_images(subject.class_noun, folder, seed=spec.seed,
                                                           base_model=spec.base_model))
    return config


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cell(spec: BenchSpec, subject: BenchSubject, label: str, models, *, progress: bool = True) -> dict:
    """Train, render and score one subject x method cell; returns (and writes) its result."""
    from ..config import config_to_toml
    from ..training import train
    from .runner import evaluate_run

    t_start = time.perf_counter()
    cell_dir = spec.output_dir / "cells" / subject.name / label
    run_dir = cell_dir / "run"
    config = cell_config(spec, subject, label, run_dir)
    train_key = _hash(config_to_toml(config))
    state_file = cell_dir / "train.json"
    state = _read_json(state_file) or {}
    train_s = 0.0
    artifact_ready = (run_dir / "artifact" / "dreamtune.json").is_file()
    if not (artifact_ready and state.get("key") == train_key and state.get("status") == "done"):
        resume = None
        if state.get("key") == train_key and (run_dir / "checkpoints").is_dir():
            resume = "latest"  # same settings, interrupted: continue from its last checkpoint
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # another spec trained this cell before: start it over
        write_json(state_file, {"key": train_key, "status": "started"})
        t = time.perf_counter()
        train(config, resume=resume, progress=progress)
        train_s = time.perf_counter() - t
        write_json(state_file, {"key": train_key, "status": "done", "train_s": train_s})
        _free_memory()
    else:
        train_s = 0.0
    eval_result = evaluate_run(
        run_dir, prompts=subject.prompts, images_per_prompt=spec.images_per_prompt, seed=spec.seed, steps=spec.steps,
        guidance=spec.guidance, live=subject.live, real_images=subject.images_dir, models=models,
        pres=bool(spec.metrics.get("pres", False)), kid=bool(spec.metrics.get("kid", False)),
        kid_features=str(spec.metrics.get("kid_features", "auto")), kid_model=spec.metrics.get("kid_model"),
        offline=bool(spec.metrics.get("offline", False)), device=spec.metrics.get("device"),
        batch_size=spec.sample_batch_size, progress=progress, embeddings=uses_embeddings(spec),
    )
    row = {"subject": subject.name, "class_noun": subject.class_noun, "live": subject.live, "method": label,
           "method_name": config.method, **{k: v for k, v in eval_result["summary"].items()}}
    extra_s = 0.0
    if spec.scorers:
        from ..data.images import load_image

        t = time.perf_counter()
        eval_dir = run_dir / "eval"
        images, prompts = [], []
        for entry in eval_result["prompts"]:
            for path in entry["images"]:
                images.append(load_image(eval_dir / path))
                prompts.append(entry["prompt"])
        for name in spec.scorers:
            for key, value in (get_scorer(name)(images, prompts, subject) or {}).items():
                row[f"{name}.{key}"] = value
        extra_s = time.perf_counter() - t
    timing = eval_result["timing"]
    total = time.perf_counter() - t_start
    row.update({
        "train_s": train_s,
        "sampling_s": timing["sampling_s"],
        "load_pipeline_s": timing["load_pipeline_s"],
        "scoring_s": timing["scoring_s"] + timing["load_scorers_s"],
        "extra_scorers_s": extra_s,
        "total_s": total,
        "overhead_s": total - train_s - timing["sampling_s"],
        "rendered": eval_result["rendered"],
        "prompts": len(eval_result["prompts"]),
        "images_per_prompt": spec.images_per_prompt,
        "key": cell_key(spec, subject, label, train_key),
    })
    write_json(cell_dir / "result.json", row)
    _free_memory()
    return row


def cell_key(spec: BenchSpec, subject: BenchSubject, label: str, train_key: str) -> str:
    """What a finished cell's result depends on: its training config and every evaluation setting."""
    return _hash({"train": train_key, "prompts": [p.template for p in subject.prompts], "live": subject.live,
                  "images": spec.images_per_prompt, "seed": spec.seed, "steps": spec.steps, "guidance": spec.guidance,
                  "metrics": {k: v for k, v in spec.metrics.items() if k not in ("device", "batch_size")},
                  "scorers": spec.scorers, "real": str(subject.images_dir)})


def real_row(spec: BenchSpec, subject: BenchSubject, models) -> dict | None:
    """The subject's real-image upper bound (each real image against the others), cached in <output_dir>/real/."""
    from ..data.images import list_images
    from . import metrics as M

    images = list_images(subject.images_dir)
    if len(images) < max(2, spec.real_min_images):
        return None
    path = spec.output_dir / "real" / f"{subject.name}.json"
    key = _hash({"images": [str(p) for p in images], "models": models.describe()})
    cached = _read_json(path)
    if cached and cached.get("key") == key:
        return cached
    scores = M.real_image_scores(images, dino=models.dino, clip=models.clip, batch_size=models.batch_size)
    row = {"subject": subject.name, "method": "Real images", **scores, "images": len(images), "key": key}
    write_json(path, row)
    return row


def uses_embeddings(spec: BenchSpec) -> bool:
    """Whether the bench loads DINO and CLIP ([metrics] embeddings, on unless set false)."""
    return bool(spec.metrics.get("embeddings", True))


def scorer_columns(spec: BenchSpec, cells: list[dict]) -> list[tuple[str, str]]:
    """The (key, title) columns the tables give the spec's scorers: each one's `table_columns`, else all its keys."""
    columns = []
    for name in spec.scorers:
        chosen = getattr(get_scorer(name), "table_columns", None)
        if chosen is None:
            keys = sorted({k.split(".", 1)[1] for c in cells for k in c if k.startswith(f"{name}.")})
            chosen = {k: k for k in keys if not k.endswith(("_low", "_high"))}
        columns += [(f"{name}.{key}", title) for key, title in chosen.items()]
    return columns


def table_rows(cells: list[dict], real: list[dict], method_order: list[str], extra_keys: Sequence[str] = ()) -> list[dict]:
    """Table 1: one row per method (plus 'Real images'), each metric averaged over subjects.

    `extra_keys` (scorers' figures) are averaged too; a method with one subject keeps that
    subject's interval (key_low, key_high) where the scorer gave one.
    """
    import numpy as np

    rows = []
    groups = [("Real images", real)] if real else []
    groups += [(m, [c for c in cells if c["method"] == m]) for m in method_order]
    for name, members in groups:
        if not members:
            continue
        row = {"method": name, "subjects": len(members)}
        for key in [k for k, _ in TABLE_METRICS] + list(extra_keys):
            values = [m[key] for m in members if m.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            if len(members) == 1 and key in extra_keys:
                row.update({f"{key}_{end}": members[0].get(f"{key}_{end}") for end in ("low", "high")})
        rows.append(row)
    return rows


def _with_intervals(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows for printing: a figure with both ends of its interval reads "0.75 [0.70,0.80]"."""
    out = []
    for row in rows:
        shown = dict(row)
        for key in keys:
            value, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
            if value is not None and low is not None and high is not None:
                shown[key] = f"{value:.2f} [{low:.2f},{high:.2f}]"
        out.append(shown)
    return out


def _tables(spec: BenchSpec, rows: list[dict], cells: list[dict], extra: list[tuple[str, str]]) -> tuple[str, str]:
    """The tables as (plain text, markdown): Table 1, then per subject when scorers gave intervals."""
    keys = [k for k, _ in extra]
    columns = [("method", "Method")] + (list(TABLE_METRICS) if uses_embeddings(spec) else []) + extra + [("subjects", "Subjects")]
    shown = _with_intervals(rows, keys)
    text, markdown = text_table(shown, columns), markdown_table(shown, columns)
    if len(spec.subjects) > 1 and any(c.get(f"{k}_low") is not None for c in cells for k in keys):
        per = [("subject", "Subject"), ("method", "Method")] + extra
        shown = _with_intervals(cells, keys)
        title = "Per subject (95% bootstrap intervals)"
        text += f"\n{title}\n" + text_table(shown, per)
        markdown += f"\n{title}:\n\n" + markdown_table(shown, per)
    if not uses_embeddings(spec):
        note = (f"DINO, CLIP-I and CLIP-T: not computed ([metrics] embeddings = false); the figures above are the "
                f"scorers' ({', '.join(spec.scorers)}), every key in cells.csv.")
        text += note + "\n"
        markdown += "\n" + note + "\n"
    return text, markdown


def run_bench(spec: str | Path | dict | BenchSpec, *, scorers: dict[str, Scorer] | None = None, models=None,
              progress: bool = True, max_cells: int | None = None, print_table: bool = True) -> dict:
    """Run (or resume) a bench; returns {'table', 'cells', 'real', 'output_dir', 'timing'}.

    `scorers` registers extra scorers for this call (names a spec lists). `models` reuses loaded
    DINO/CLIP models (`ScoringModels`); none are loaded when the spec sets [metrics] embeddings =
    false. `max_cells` stops after that many cells were computed now (the rest are done by the next
    call). Finished cells are read back, not recomputed.
    """
    from tqdm.auto import tqdm

    from .runner import ScoringModels

    for name, fn in (scorers or {}).items():
        register_scorer(name, fn)
    if not isinstance(spec, BenchSpec):
        spec = load_spec(spec)
    t_start = time.perf_counter()
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    prepare_subjects(spec)
    metrics = spec.metrics
    embeddings = uses_embeddings(spec)
    if models is None and embeddings:
        models = ScoringModels.load(metrics.get("dino_model"), metrics.get("clip_model"), offline=bool(metrics.get("offline", False)),
                                    device=metrics.get("device"), batch_size=int(metrics.get("batch_size", 32)))
    labels = list(spec.methods)
    jobs = [(s, m) for s in spec.subjects for m in labels]
    cells, computed, skipped = [], 0, 0
    bar = tqdm(jobs, desc="bench", disable=not progress, unit="cell")
    for subject, label in bar:
        bar.set_postfix_str(f"{subject.name} x {label}")
        cell_dir = spec.output_dir / "cells" / subject.name / label
        done = _read_json(cell_dir / "result.json")
        if done is not None:
            state = _read_json(cell_dir / "train.json") or {}
            if done.get("key") == cell_key(spec, subject, label, state.get("key", "")):
                cells.append(done)
                skipped += 1
                continue
        if max_cells is not None and computed >= max_cells:
            continue
        cells.append(run_cell(spec, subject, label, models, progress=progress))
        computed += 1
    bar.close()
    real = [r for r in (real_row(spec, s, models) for s in spec.subjects) if r is not None] if embeddings else []
    extra = scorer_columns(spec, cells)
    rows = table_rows(cells, real, labels, [k for k, _ in extra])
    text, markdown = _tables(spec, rows, cells, extra)
    write_text(spec.output_dir / "table.md", markdown)
    fields = ["subject", "class_noun", "live", "method", "method_name"]
    if embeddings:
        fields += ["dino", "clip_i", "clip_t", "clipscore", "div", "pres", "kid", "kid_std"]
    fields += sorted({k for c in cells for k in c if "." in k})
    fields += ["train_s", "sampling_s", "load_pipeline_s", "scoring_s", "extra_scorers_s", "overhead_s", "total_s", "rendered"]
    write_csv(spec.output_dir / "cells.csv", cells, fields)
    timing = {"bench_s": time.perf_counter() - t_start, "computed_cells": computed, "skipped_cells": skipped,
              "train_s": sum(c.get("train_s", 0.0) for c in cells), "sampling_s": sum(c.get("sampling_s", 0.0) for c in cells),
              "overhead_s": sum(c.get("overhead_s", 0.0) for c in cells)}
    summary = {"table": rows, "cells": cells, "real": real, "output_dir": str(spec.output_dir), "timing": timing,
               "models": models.describe() if models is not None else {}, "embeddings": embeddings,
               "pending_cells": len(jobs) - len(cells)}
    write_json(spec.output_dir / "summary.json", summary)
    if print_table:
        print(text, end="")
        if summary["pending_cells"]:
            print(f"{summary['pending_cells']} cells not run yet; run the bench again to continue.")
        print(f"cells: {spec.output_dir / 'cells.csv'}  table: {spec.output_dir / 'table.md'}")
    return summary
