"""`dreamtune demo`: teach the shipped shapes-world model one subject and measure it with the oracle.

The journey a user takes with their own photos, on the world where an exact oracle can score it:
write a subject's 5 reference images, train DreamBooth with prior preservation (and Custom Diffusion
beside it), sample the subject's DreamBench-style prompts with the base model and each personalized
one, and compare subject fidelity, prompt fidelity and language drift. Writes `grid.png`,
`report.html` and `metrics.json` into the output folder.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreamtuneError
from ..io import save_image, write_json, write_text
from . import MODEL_DIR, oracle
from .quality import DEFAULT_GUIDANCE
from .scores import SubjectScores, format_attributes, format_scores, score_subject
from .subjects import Subject, class_prompt, get_subject, subject_prompts, write_subject_images

# Personalized models are sampled with 15 DDIM steps (the base model's quality bar is taken at 25): on
# the striped star's DreamBooth model 15 steps gave the same figures as 25 to two decimals, on Custom
# Diffusion's subject fidelity 0.39 against 0.43 (interval +-0.09), in 60% of the time.
SAMPLING_STEPS = 15
# 8 images per prompt: at 2, one model's figures moved by 0.15 between runs.
IMAGES_PER_PROMPT = 8
# Images of the plain class prompt for drift and diversity: three prompts' worth, at least 12.
CLASS_IMAGES_PER_PROMPT_IMAGE = 3
MIN_CLASS_IMAGES = 12

# The world's settings per method, for the shipped base model (32 px), chosen on the shipped subjects and
# used unchanged on generated ones. DreamBooth trains the UNet with the text encoder frozen, as the papers
# do: the base model's captions use rare words as names ("sks" names one object of its own), so "a sks
# star" is a phrase its text encoder tells apart from "a star" (striped star, 400 steps: subject 0.92,
# joint 0.58; on the earlier base, whose rare words named nothing, the encoder had to be tuned). Custom
# Diffusion's rescale augmentation is off: at 32 px a "very small" subject keeps no readable pattern,
# and "zoomed in" is outside the world's vocabulary. Its 600 steps at 1e-3 (striped star, 8 images per
# prompt): subject 0.57, prompt 0.79, joint 0.19, against 0.47 / 0.78 / 0.10 at 300 steps; a higher
# rate learns more of the subject and loses the prompt (3e-3, 600 steps: 0.70, prompt 0.57). Its
# modifier token learns at 2e-2 (`text_encoder_lr`; Textual Inversion's token rates are of that order),
# the keys and values at 1e-3: on the three shipped subjects tried (striped star, eye circle, split
# heart), subject present in 0.24 / 0.35 / 0.21 of images against 0.18 / 0.31 / 0.12 with the token at
# 1e-3, joint success 0.23 / 0.31 / 0.19 against 0.12 / 0.28 / 0.12, subject fidelity the same within
# noise (0.57 / 0.63 / 0.54 against 0.56 / 0.65 / 0.50), prompt fidelity too. (Those were measured on the
# previous base model; on today's, the striped star: subject 0.58, present 0.18, joint 0.12.)
METHOD_SETTINGS = {
    "dreambooth": {"identifier": "sks", "max_train_steps": 400, "learning_rate": 1e-4, "train_batch_size": 2,
                   "train_text_encoder": False},
    # Regularised as in the paper, with 200 real images of the class and their captions (the world's drawn
    # scenes, `compare.write_real_class_images`): captions that name backgrounds and sizes keep those words
    # working while the keys and values change.
    "custom_diffusion": {"identifier": "<new1>", "max_train_steps": 600, "learning_rate": 1e-3,
                         "text_encoder_lr": 2e-2, "train_batch_size": 2, "scale_lr": False, "augment": "off",
                         "num_class_images": 200},
    "textual_inversion": {"identifier": "<new1>", "max_train_steps": 500, "learning_rate": 5e-3,
                          "train_batch_size": 2, "scale_lr": False, "with_prior_preservation": False},
    "lora": {"identifier": "sks", "max_train_steps": 400, "learning_rate": 1e-3, "train_batch_size": 2,
             "train_text_encoder": True},
}
# The demo's default methods (the others run with --method NAME or in `dreamtune world compare`).
DEMO_METHODS = ("dreambooth", "custom_diffusion")


@dataclass
class ModelScores:
    """The oracle's verdict on one model for one subject (see `dreamtune.world.scores`).

    The plain numbers are the figures' values; `figures` has each with its bootstrap interval.
    """

    name: str
    subject_fidelity: float
    prompt_fidelity: float
    language_drift: float
    class_diversity: float
    train_seconds: float = 0.0
    subject_present: float = float("nan")
    joint: float = float("nan")
    per_attribute: dict = field(default_factory=dict)
    figures: SubjectScores | None = None

    def __post_init__(self) -> None:
        # Rows read back from JSON (a compare cell) carry the figures as plain dicts.
        if isinstance(self.figures, dict):
            self.figures = SubjectScores.from_dict(self.figures)

    def as_dict(self) -> dict:
        """Plain numbers for metrics.json, intervals included."""
        out = {k: v for k, v in vars(self).items() if k != "figures"}
        if self.figures is not None:
            out["intervals"] = self.figures.as_dict()
        return out


def available_methods() -> list[str]:
    """The demo methods this installation of dreamtune provides."""
    from ..methods import METHODS, get_method

    found = []
    for name in METHOD_SETTINGS:
        if name in METHODS:
            try:
                get_method(name)
            except DreamtuneError:
                continue
            found.append(name)
    return found


def _methods(method: str) -> list[str]:
    available = available_methods()
    if method == "all":
        return [m for m in available if m in DEMO_METHODS]
    wanted = [m.strip() for m in method.split(",") if m.strip()]
    for name in wanted:
        if name not in available:
            raise DreamtuneError(f"--method: '{name}' is not available for the demo; choose from "
                                 f"{', '.join(available)} or 'all'")
    return wanted


def train_config(subject: Subject, method: str, instance_dir: Path, class_dir: Path, output_dir: Path, *,
                 steps: int | None, seed: int, with_prior_preservation: bool = True, num_class_images: int = 40,
                 base_model: Path = MODEL_DIR):
    """The TrainConfig the demo uses for a method on a subject (the shipped base model, 32 px)."""
    from ..config import ConceptConfig, TrainConfig

    settings = {"with_prior_preservation": with_prior_preservation, "num_class_images": num_class_images,
                **METHOD_SETTINGS[method]}
    if not with_prior_preservation:
        settings["with_prior_preservation"] = False
    identifier = settings.pop("identifier")
    if steps is not None:
        settings["max_train_steps"] = steps
    concept = ConceptConfig(
        instance_data_dir=str(instance_dir),
        identifier=identifier,
        class_noun=subject.class_noun,
        instance_prompt="a photo of a {identifier} {class_noun}",
        class_prompt="a photo of a {class_noun}",
        class_data_dir=str(class_dir),
        initializer_token=subject.class_noun,
    )
    return TrainConfig(
        pretrained_model_name_or_path=str(base_model),
        method=method,
        output_dir=str(output_dir),
        seed=seed,
        resolution=32,
        sample_batch_size=20,
        class_generation_steps=SAMPLING_STEPS,
        class_generation_guidance=DEFAULT_GUIDANCE,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=1,
        validation_guidance_scale=DEFAULT_GUIDANCE,
        validation_inference_steps=SAMPLING_STEPS,
        concepts=[concept],
        **settings,
    )


def score_model(name: str, pipe, subject: Subject, identifier: str, *, seed: int,
                images_per_prompt: int = IMAGES_PER_PROMPT, progress: bool = False) -> tuple[ModelScores, dict]:
    """Sample a subject's prompts and its plain class prompt with a pipeline and score them in the papers' protocol.

    Each image of a personalized prompt is scored for subject fidelity against the subject's identity
    and for the attributes its prompt names; see `dreamtune.world.scores`.
    """
    from ..pipeline import sample

    prompts = subject_prompts(subject)
    texts = [p.format(identifier, subject.class_noun) for p in prompts]
    images = sample(pipe, texts, num_images=images_per_prompt, seed=seed, steps=SAMPLING_STEPS,
                    guidance=DEFAULT_GUIDANCE, batch_size=32, height=32, width=32, progress=progress)
    readings = oracle.read_all(images)
    by_prompt = [readings[i * images_per_prompt:(i + 1) * images_per_prompt] for i in range(len(prompts))]
    class_count = max(MIN_CLASS_IMAGES, CLASS_IMAGES_PER_PROMPT_IMAGE * images_per_prompt)
    class_images = sample(pipe, [class_prompt(subject)], num_images=class_count, seed=seed + 1000,
                          steps=SAMPLING_STEPS, guidance=DEFAULT_GUIDANCE, batch_size=32, height=32, width=32)
    class_readings = oracle.read_all(class_images)
    figures = score_subject(by_prompt, [p.attributes for p in prompts], subject.identity(), class_readings,
                            seed=seed)
    scores = ModelScores(
        name=name,
        subject_fidelity=figures.subject_fidelity.value,
        prompt_fidelity=figures.prompt_fidelity.value,
        language_drift=figures.language_drift.value,
        class_diversity=figures.diversity.value,
        subject_present=figures.subject_present.value,
        joint=figures.joint.value,
        per_attribute={k: f.value for k, f in figures.per_attribute.items()},
        figures=figures,
    )
    return scores, {"texts": texts, "prompts": prompts, "images": images, "class_images": class_images}


def format_table(rows: list[ModelScores]) -> str:
    """The demo's metrics as plain text: one row per model with 95% intervals, then its per-attribute prompt fidelity."""
    lines = []
    for r in rows:
        if r.figures is None:
            lines.append(f"{r.name:<18} subject {r.subject_fidelity:.2f}  prompt {r.prompt_fidelity:.2f}  "
                         f"drift {r.language_drift:.2f}  div {r.class_diversity:.2f}")
            continue
        lines.append(format_scores(r.name, r.figures) + (f"  train {r.train_seconds:.0f} s" if r.train_seconds else ""))
        lines.append(format_attributes(r.figures))
    return "\n".join(lines)


def _grid(rows: list[tuple[str, list]], columns: list[str], cell: int = 96):
    from PIL import Image, ImageDraw

    label_w, head_h = 130, 16
    width = label_w + cell * max(len(images) for _, images in rows)
    grid = Image.new("RGB", (width, head_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(columns):
        draw.text((label_w + c * cell + 2, 2), text[:16], fill="black")
    for r, (name, images) in enumerate(rows):
        draw.text((4, head_h + r * cell + cell // 2 - 6), name, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_w + c * cell, head_h + r * cell))
    return grid


def _html(subject: Subject, rows: list[ModelScores], grid, references_grid) -> str:
    def embed(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    head = "".join(f"<th>{h}</th>" for h in ("model", "subject fidelity", "subject present", "prompt fidelity",
                                              "joint success", "language drift", "class diversity", "train seconds"))

    def cell(r: ModelScores, key: str, value: float) -> str:
        figure = getattr(r.figures, key, None) if r.figures is not None else None
        return f"<td>{figure}</td>" if figure is not None else f"<td>{value:.2f}</td>"

    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td>{cell(r, 'subject_fidelity', r.subject_fidelity)}"
        f"{cell(r, 'subject_present', r.subject_present)}{cell(r, 'prompt_fidelity', r.prompt_fidelity)}"
        f"{cell(r, 'joint', r.joint)}{cell(r, 'language_drift', r.language_drift)}"
        f"{cell(r, 'diversity', r.class_diversity)}<td>{r.train_seconds:.0f}</td></tr>"
        for r in rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dreamtune demo: {html.escape(subject.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>dreamtune demo: {html.escape(subject.description)}</h1>
<p>Subject <b>{html.escape(subject.name)}</b> (class "{html.escape(subject.class_noun)}"), reference images:</p>
<img src="{embed(references_grid)}">
<h2>Oracle metrics</h2>
<table><tr>{head}</tr>{body}</table>
<p>Every image of a personalized prompt is scored twice. Subject fidelity: the share of the subject's
identity (class, both colours, pattern and its geometry) it matches; subject present: all of it.
Prompt fidelity: the share of the attributes its prompt names (background, size, colour; never
the subject's class) it honours. Joint success: subject present and every named attribute honoured.
Language drift: share of images of "{html.escape(class_prompt(subject))}" that show the subject's look
(pattern, geometry and colours). Class diversity: chance that two of those images differ in an attribute.
Brackets: 95% bootstrap intervals (prompts, then images, resampled).</p>
<h2>Samples</h2><img src="{embed(grid)}">
</body></html>
"""


def _quiet_libraries() -> None:
    # Loading bars and notices of diffusers and transformers would bury the demo's own progress.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_jobs(models: int, asked: int | None = None) -> int:
    """Worker processes for `models` independent models: `asked` (a --jobs value) or else one per core this
    process may use, never more than one a model.

    The demo's models are small, so one model's step keeps a core busy and not two: on 2 cores,
    DreamBooth and Custom Diffusion side by side at a thread each finish sooner than one after the other at two.
    """
    return max(1, min(_cores() if asked is None else asked, models))


@contextmanager
def worker_pool(jobs: int, what: str, say):
    """A pool of `jobs` fresh worker processes that share the cores out; yields (pool, threads per worker).

    Says what runs in it. On an error or Ctrl-C, work not yet started is dropped.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, _cores() // jobs)
    say(f"{what} in {jobs} worker processes ({threads} thread{'s' if threads > 1 else ''} each); "
        "each line below is one finished")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        try:
            yield pool, threads
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def use_threads(threads: int | None) -> None:
    """Set torch's thread count in a worker process (None: leave it)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _model_job(name: str, *, subject: str, base_model: Path, out: Path, steps: int | None, seed: int,
               images_per_prompt: int, progress: bool, threads: int | None = None) -> tuple[ModelScores, dict]:
    """One row of the demo: score the base model, or train a method on the subject and score the result.

    Runs in the demo's process or in a worker process (then with `threads` torch threads); every
    input is a seed or a file, so the row is the same either way.
    """
    from ..pipeline import load_pipeline
    from ..training import train

    use_threads(threads)
    _quiet_libraries()
    chosen = get_subject(subject)
    if name == "base model":
        pipe = load_pipeline(str(base_model))
        return score_model(name, pipe, chosen, "sks", seed=seed, progress=progress,
                           images_per_prompt=images_per_prompt)
    class_dir = out / "class_images"
    if name == "custom_diffusion":
        from .compare import write_real_class_images

        class_dir = write_real_class_images(chosen.class_noun, out / "real_images" / chosen.class_noun, seed=seed,
                                            base_model=base_model)
    config = train_config(chosen, name, out / "subject", class_dir, out / name, steps=steps, seed=seed,
                          base_model=base_model)
    t0 = time.monotonic()
    result = train(config, overwrite=True, progress=progress)
    seconds = time.monotonic() - t0
    pipe = load_pipeline(str(base_model), result.artifact_dir)
    scores, data = score_model(name, pipe, chosen, config.concepts[0].identifier, seed=seed, progress=progress,
                               images_per_prompt=images_per_prompt)
    scores.train_seconds = seconds
    return scores, data


def _training_step(run_dir: Path) -> int:
    """The last step in a training run's metrics log (`logs/metrics.csv`), 0 before its first."""
    try:
        last = (run_dir / "logs" / "metrics.csv").read_text().strip().splitlines()[-1]
        return int(last.split(",")[0])
    except (OSError, IndexError, ValueError):  # not there yet, only its header, or a line half written
        return 0


def _run_jobs(names: list[str], jobs: int, job_args: dict, say, started: float,
              bars: bool = False) -> list[tuple[ModelScores, dict]]:
    """`_model_job` for each name in `jobs` worker processes (the cores shared out), in the names' order.

    With `bars`, a progress bar per trained model follows its training steps from its metrics log.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    from tqdm.auto import tqdm

    with worker_pool(jobs, f"{len(names)} models", say) as (pool, threads):
        trained = [n for n in names if n != "base model"]
        steps = {n: job_args["steps"] or METHOD_SETTINGS[n]["max_train_steps"] for n in trained}
        shown = {n: tqdm(total=steps[n], desc=f"{n} training", unit="step", position=i, leave=False)
                 for i, n in enumerate(trained)} if bars else {}
        note = tqdm.write if shown else say
        futures = {pool.submit(_model_job, name, progress=False, threads=threads, **job_args): name
                   for name in names}
        remaining = set(futures)
        try:
            while remaining:
                done, remaining = wait(remaining, timeout=1.0, return_when=FIRST_COMPLETED)
                for name, bar in shown.items():
                    bar.update(max(bar.n, _training_step(job_args["out"] / name)) - bar.n)
                for future in done:
                    scores, _ = future.result()
                    trained_in = f", trained in {scores.train_seconds:.0f} s" if scores.train_seconds else ""
                    note(f"  {futures[future]}: scored{trained_in} ({time.monotonic() - started:.0f} s)")
        finally:
            for bar in shown.values():
                bar.close()
        return [future.result() for future in futures]


def run_demo(subject: str = "striped_star", method: str = "all", steps: int | None = None,
             output_dir: str | Path = "dreamtune-demo", overwrite: bool = False, seed: int = 0,
             progress: bool = True, quiet: bool = False, model: str | Path | None = None,
             images_per_prompt: int = IMAGES_PER_PROMPT, jobs: int | None = None) -> list[ModelScores]:
    """Personalize the shipped model on a shipped subject with each method; print and write the comparison.

    Returns one `ModelScores` per model (the base model first). Refuses a non-empty `output_dir`
    unless `overwrite`. `model` is another shapes-world pipeline folder (default: the shipped one).
    `jobs` worker processes share the models out (default: one per core, at most one per model); with
    1 everything runs in this process, with progress bars.
    """
    chosen = get_subject(subject)
    methods = _methods(method)
    base_model = Path(model).expanduser() if model else MODEL_DIR
    if not (base_model / "model_index.json").exists():
        if model:
            raise DreamtuneError(f"--model {base_model} is not a pipeline folder (no model_index.json)")
        raise DreamtuneError(f"the shapes-world base model is missing from {MODEL_DIR}; reinstall dreamtune "
                             "(`pip install -c constraints.txt -e .` in a clone) to get it back")
    out = Path(output_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DreamtuneError(f"--output-dir {out} is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    say = (lambda *a: None) if quiet else print
    _quiet_libraries()
    started = time.monotonic()
    instance_dir = out / "subject"
    write_subject_images(chosen, instance_dir)
    say(f"subject {chosen.name}: {chosen.description}; {len(chosen.reference_scenes())} images in {instance_dir}")

    names = ["base model", *methods]
    jobs = default_jobs(len(names), jobs)
    job_args = {"subject": chosen.name, "base_model": base_model, "out": out, "steps": steps, "seed": seed,
                "images_per_prompt": images_per_prompt}
    if jobs == 1:
        results = [_model_job(name, progress=progress, **job_args) for name in names]
    else:
        results = _run_jobs(names, jobs, job_args, say, started, bars=progress and not quiet)
    rows = [scores for scores, _ in results]
    samples = {name: data for name, (_, data) in zip(names, results)}

    # Grid: one row per model, the first image of a spread of prompts, then two plain-class images.
    prompts = samples["base model"]["prompts"]
    picks = [0, 1, 3, 8, 12, 14, 16, len(prompts) - 1]
    columns = [", ".join(f"{v} bg" if k == "background" else v for k, v in prompts[i].attributes.items())
               or "(subject)" for i in picks]
    columns += [chosen.class_noun, chosen.class_noun]
    grid_rows = []
    for name, data in samples.items():
        images = [data["images"][i * images_per_prompt] for i in picks] + data["class_images"][:2]
        grid_rows.append((name, images))
    grid = _grid(grid_rows, columns)
    references_grid = _grid([("references", chosen.reference_images())], [""] * len(chosen.reference_scenes()))
    save_image(grid, out / "grid.png")
    write_text(out / "report.html", _html(chosen, rows, grid, references_grid))
    write_json(out / "metrics.json", {"subject": chosen.name, "seconds": time.monotonic() - started,
                                      "models": [r.as_dict() for r in rows]})
    say("")
    say(format_table(rows))
    say(f"\ngrid: {out / 'grid.png'}  report: {out / 'report.html'}  ({time.monotonic() - started:.0f} s)")
    return rows
