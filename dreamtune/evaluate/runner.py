"""`dreamtune eval`: render a run's evaluation prompts, score them, write the reports into RUN/eval/.

Rendered images are kept in RUN/eval/images/. Each file's name carries a key made of the prompt,
seed, image index, sampling steps, guidance, resolution and a fingerprint of the artifact, so a
second evaluation with the same settings renders nothing again, and a retrained artifact is never
scored from stale images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DreamtuneError
from . import metrics as M
from .prompts import EvalPrompt, is_live, resolve_prompts
from .report import write_reports

logger = logging.getLogger(__name__)


EMBEDDINGS_OFF_NOTE = ("DINO, CLIP-I, CLIP-T, CLIPScore and DIV were not computed: the embedding metrics are off "
                       "(a bench spec's [metrics] embeddings = false).")


@dataclass
class ScoringModels:
    """The feature models one evaluation uses (loaded once, reused across runs and cells)."""

    dino: M.ImageEmbedder
    clip: M.ClipEmbedder
    batch_size: int = 32

    @classmethod
    def load(cls, dino_model: str | None = None, clip_model: str | None = None, *, offline: bool = False,
             device: str | None = None, batch_size: int = 32) -> ScoringModels:
        """Load the DINO and CLIP models (hub ids or local folders; defaults: the papers' models)."""
        return cls(M.load_embedder("dino", dino_model, offline=offline, device=device),
                   M.load_embedder("clip", clip_model, offline=offline, device=device), batch_size)

    def describe(self) -> dict[str, str]:
        return {"dino": self.dino.describe(), "clip": self.clip.describe()}


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def image_key(prompt: str, seed: int, index: int, steps: int, guidance: float, resolution: int, fingerprint: str) -> str:
    """The cache key of one rendered image."""
    payload = json.dumps([prompt, seed, index, steps, float(guidance), resolution, fingerprint])
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:12]


def artifact_fingerprint(artifact_dir: Path) -> str:
    """A short hash of an artifact folder's metadata and its files' names, sizes and modification times."""
    h = hashlib.sha1()
    for path in sorted(p for p in Path(artifact_dir).rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(artifact_dir).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
        if path.name == "dreamtune.json":
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


class ImageCache:
    """Rendered images of one artifact under a folder, found again by (prompt, seed, index, settings)."""

    def __init__(self, folder: Path, *, seed: int, steps: int, guidance: float, resolution: int, fingerprint: str):
        self.folder = Path(folder)
        self.seed, self.steps, self.guidance, self.resolution, self.fingerprint = seed, steps, guidance, resolution, fingerprint

    def path(self, prompt: str, index: int) -> Path:
        """Where image `index` of `prompt` is (or will be) stored."""
        key = image_key(prompt, self.seed, index, self.steps, self.guidance, self.resolution, self.fingerprint)
        return self.folder / f"{_slug(prompt)}-{index}-{key}.png"

    def render(self, prompts: list[str], num_images: int, get_pipe, *, batch_size: int = 8, progress: bool = False) -> tuple[dict, int]:
        """Make sure every image exists; returns ({prompt: [paths]}, images rendered now).

        `get_pipe()` is only called when something is missing. Image i of a prompt uses seed
        `seed + i` (see `dreamtune.pipeline.sample`), so cached and new images agree.
        """
        from ..io import save_image
        from ..pipeline import sample

        paths = {p: [self.path(p, i) for i in range(num_images)] for p in prompts}
        missing = [(p, i) for p in prompts for i in range(num_images) if not paths[p][i].is_file()]
        if not missing:
            return paths, 0
        pipe = get_pipe()
        missing_set = set(missing)
        whole = [p for p in prompts if all((p, i) in missing_set for i in range(num_images))]
        whole_set = set(whole)
        partial = [(p, i) for p, i in missing if p not in whole_set]
        kwargs = {"steps": self.steps, "guidance": self.guidance, "height": self.resolution, "width": self.resolution,
                  "batch_size": batch_size}
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc="rendering", disable=not progress, leave=False)
        # Prompts with no image yet go through in groups, so the sampler batches across prompts.
        group = max(1, batch_size // num_images)
        for start in range(0, len(whole), group):
            chunk = whole[start : start + group]
            images = sample(pipe, chunk, num_images=num_images, seed=self.seed, **kwargs)
            for n, image in enumerate(images):
                save_image(image, paths[chunk[n // num_images]][n % num_images])
            bar.update(len(images))
        for p, i in partial:
            image = sample(pipe, [p], num_images=1, seed=self.seed + i, **kwargs)[0]
            save_image(image, paths[p][i])
            bar.update(1)
        bar.close()
        return paths, len(missing)


def _resolve_dir(value: str, run_dir: Path) -> Path | None:
    for candidate in (Path(value).expanduser(), run_dir / value, run_dir.parent / value):
        if str(value) and candidate.is_dir():
            return candidate
    return None


def score_prompt_groups(groups: list[tuple[str, str, list]], real_images: list, models: ScoringModels) -> list[dict]:
    """Score (prompt, scoring prompt, images) groups against the real images: DINO, CLIP-I, CLIP-T, CLIPScore, DIV."""
    bs = models.batch_size
    real_dino = models.dino.embed_images(real_images, bs)
    real_clip = models.clip.embed_images(real_images, bs)
    all_images = [im for _, _, images in groups for im in images]
    gen_dino = models.dino.embed_images(all_images, bs)
    gen_clip = models.clip.embed_images(all_images, bs)
    texts = sorted({scoring for _, scoring, _ in groups})
    text = dict(zip(texts, models.clip.embed_texts(texts)))
    rows, start = [], 0
    for prompt, scoring, images in groups:
        d, c = gen_dino[start : start + len(images)], gen_clip[start : start + len(images)]
        start += len(images)
        cos = c @ text[scoring]
        rows.append({
            "prompt": prompt,
            "scoring_prompt": scoring,
            "dino": M.mean_pairwise_cosine(d, real_dino),
            "clip_i": M.mean_pairwise_cosine(c, real_clip),
            "clip_t": float(cos.mean()),
            "clipscore": M.clipscore_of(cos),
            "div": M.mean_pairwise_distance(d) if len(images) > 1 else None,
        })
    return rows


def summarize(rows: list[dict], keys=("dino", "clip_i", "clip_t", "clipscore", "div")) -> dict:
    """Means over prompts (every prompt has the same number of images, so also means over images)."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def evaluate_run(
    run_dir: str | Path,
    *,
    prompts: str | Path | list = "dreambench",
    images_per_prompt: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    live: bool | None = None,
    real_images: str | Path | None = None,
    concept_index: int = 0,
    models: ScoringModels | None = None,
    dino_model: str | None = None,
    clip_model: str | None = None,
    offline: bool = False,
    device: str | None = None,
    pres: bool = True,
    kid: bool = False,
    kid_features: str = "auto",
    kid_model: str | None = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    pipe=None,
    embed_images: bool = True,
    progress: bool = True,
    config=None,
    embeddings: bool = True,
) -> dict:
    """Render a run's evaluation prompts with its artifact, score them and write RUN/eval/ reports.

    `prompts`: 'dreambench' (the built-in 25 DreamBench-style prompts, live or object list by the
    class noun unless `live` says), a prompt file (one template per line, or google/dreambooth's
    prompts_and_classes.txt), or a list of templates with {identifier}/{class_noun}. Steps and
    guidance default to the run's validation settings. Images already rendered with the same
    settings are reused. PRES renders the run's class prompt too; KID is off by default (it needs
    many images). Returns the result dict also written to metrics.json.

    `embeddings=False` renders and reports the images without loading DINO or CLIP: no DINO,
    CLIP-I, CLIP-T, CLIPScore or DIV (a note says so), and PRES and KID cannot be asked for.

    `run_dir` may also be an artifact without a run folder (dreamtune's, or weights trained elsewhere
    that `read_artifact` recognises); then `config` gives the base model, the concept and the
    resolution (see `artifact_config`).
    """
    from ..artifacts import read_artifact
    from ..config import load_config
    from ..data.images import list_images

    t_start = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    if config is None:
        if not (run_dir / "config.toml").is_file():
            raise DreamtuneError(f"{run_dir}: not a dreamtune run folder (no config.toml). Pass the run's --output-dir, "
                                 "or for an artifact alone its base model, class noun and real images (--base, "
                                 "--class-noun, --real-images).")
        config = load_config(run_dir / "config.toml")
    info = read_artifact(run_dir)
    if not config.concepts or concept_index >= len(config.concepts):
        raise ConfigError(f"{run_dir / 'config.toml'}: no concept number {concept_index} to evaluate.")
    concept = config.concepts[concept_index]
    identifier, class_noun = concept.identifier, concept.class_noun
    live = is_live(class_noun) if live is None else live
    real_dir = Path(real_images).expanduser() if real_images else _resolve_dir(concept.instance_data_dir, run_dir)
    if real_dir is None:
        raise DreamtuneError(f"{run_dir}: the subject's images '{concept.instance_data_dir}' are not there any more; pass --real-images DIR.")
    real_paths = list_images(real_dir, what="--real-images")
    eval_prompts = resolve_prompts(prompts, live=live)
    if images_per_prompt < 1:
        raise ConfigError(f"--images-per-prompt must be at least 1; got {images_per_prompt}.")
    if not embeddings and (pres or kid):
        raise ConfigError("PRES and KID need the embedding models: turn them off, or the embedding metrics on.")
    steps = int(steps or config.validation_inference_steps)
    guidance = float(config.validation_guidance_scale if guidance is None else guidance)

    out_dir = Path(output_dir).expanduser() if output_dir else run_dir / "eval"
    cache = ImageCache(out_dir / "images", seed=seed, steps=steps, guidance=guidance, resolution=config.resolution,
                       fingerprint=artifact_fingerprint(info.path))
    texts = [p.fill(identifier, class_noun) for p in eval_prompts]
    class_prompt = concept.class_prompt_text if pres else None
    render_list = list(dict.fromkeys(texts + ([class_prompt] if class_prompt else [])))

    timing = {"load_pipeline_s": 0.0}
    holder = {"pipe": pipe}

    def get_pipe():
        if holder["pipe"] is None:
            from ..pipeline import load_pipeline

            t = time.perf_counter()
            base = None if info.is_full_pipeline else config.pretrained_model_name_or_path
            holder["pipe"] = load_pipeline(base, run_dir, device=device)
            timing["load_pipeline_s"] = time.perf_counter() - t
        return holder["pipe"]

    t = time.perf_counter()
    paths, rendered = cache.render(render_list, images_per_prompt, get_pipe, batch_size=batch_size, progress=progress)
    timing["sampling_s"] = time.perf_counter() - t - timing["load_pipeline_s"]

    t = time.perf_counter()
    if models is None and embeddings:
        models = ScoringModels.load(dino_model, clip_model, offline=offline, device=device)
    timing["load_scorers_s"] = time.perf_counter() - t
    t = time.perf_counter()
    groups = [(text, M.scoring_prompt(text, identifier, class_noun), paths[text]) for text in texts]
    notes = []
    if embeddings:
        rows = score_prompt_groups(groups, real_paths, models)
    else:
        rows = [{"prompt": text, "scoring_prompt": scoring} for text, scoring, _ in groups]
        notes.append(EMBEDDINGS_OFF_NOTE)
    kinds = {text: p.kind for text, p in zip(texts, eval_prompts)}
    for row in rows:
        row["kind"] = kinds[row["prompt"]]
        row["images"] = [p.relative_to(out_dir).as_posix() for p in paths[row["prompt"]]]
    summary = summarize(rows)
    class_entry = None
    if class_prompt:
        class_dino = models.dino.embed_images(paths[class_prompt], models.batch_size)
        summary["pres"] = M.mean_pairwise_cosine(class_dino, models.dino.embed_images(real_paths, models.batch_size))
        class_entry = {"prompt": class_prompt, "images": [p.relative_to(out_dir).as_posix() for p in paths[class_prompt]],
                       "pres": summary["pres"]}
    if kid:
        all_generated = [p for text in texts for p in paths[text]]
        out = M.kid_score(all_generated, real_paths, features=kid_features, model=kid_model, offline=offline, device=device)
        summary["kid"], summary["kid_std"] = out["kid"], out["kid_std"]
        notes.append(f"KID features: {out['note']}.")
    timing["scoring_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t_start

    result = {
        "title": f"{info.method} run {run_dir.name}: {identifier} {class_noun}",
        "run": str(run_dir),
        "method": info.method,
        "base_model": info.base_model,
        "identifier": identifier,
        "class_noun": class_noun,
        "live": live,
        "settings": {"prompts": str(prompts) if not isinstance(prompts, list) else f"{len(prompts)} given",
                     "prompt_count": len(texts), "images_per_prompt": images_per_prompt, "seed": seed,
                     "steps": steps, "guidance": guidance, "resolution": config.resolution},
        "models": models.describe() if embeddings else {},
        "summary": summary,
        "prompts": rows,
        "class_prompt": class_entry,
        "real_images": [str(p.resolve()) for p in real_paths],
        "rendered": rendered,
        "timing": timing,
        "notes": notes,
    }
    write_reports(result, out_dir, embed_images=embed_images)
    return result


def artifact_config(artifact: str | Path, *, real_images: str | Path, base: str | None = None, class_noun: str = "",
                    identifier: str = "", resolution: int | None = None):
    """A config for evaluating an artifact that has no run folder: its base model, one concept, a resolution.

    The base model, identifier and class noun default to what the artifact records (its metadata, or
    the model card beside weights trained elsewhere); the resolution to 512.
    """
    from ..artifacts import read_artifact
    from ..config import load_config

    info = read_artifact(artifact)
    known = (info.extra.get("concepts") or [{}])[0]
    identifier = identifier or known.get("identifier") or (info.tokens[0] if info.tokens else "")
    class_noun = class_noun or known.get("class_noun", "")
    if not class_noun:
        raise ConfigError(f"{artifact}: the artifact does not name its subject's class; pass --class-noun.")
    base = base or info.base_model
    if not base:
        raise ConfigError(f"{artifact}: the artifact does not say which base model it was trained on; pass --base.")
    values = {"resolution": resolution} if resolution else {}
    return load_config(None, pretrained_model_name_or_path=base, method=info.method, concepts=[
        {"instance_data_dir": str(real_images), "identifier": identifier or "sks", "class_noun": class_noun}], **values)


def score_folders(images_dir: str | Path, references_dir: str | Path, *, prompt: str | None = None,
                  identifier: str = "", class_noun: str = "", models: ScoringModels | None = None,
                  dino_model: str | None = None, clip_model: str | None = None, offline: bool = False,
                  device: str | None = None, kid: bool = False, kid_features: str = "auto", kid_model: str | None = None,
                  output_dir: str | Path | None = None) -> dict:
    """Score a folder of images against a folder of reference images (`dreamtune metrics`).

    CLIP-T uses `prompt` for every image, else a same-named .txt caption beside each image (when
    every image has one); `identifier`/`class_noun` turn the prompt into its scoring form. Writes the
    reports into `output_dir` when given.
    """
    from ..data.images import list_images

    images = list_images(images_dir, what="IMAGES")
    references = list_images(references_dir, what="REFERENCES")
    if models is None:
        models = ScoringModels.load(dino_model, clip_model, offline=offline, device=device)
    captions = [p.with_suffix(".txt") for p in images]
    if prompt is not None:
        prompt_of = [prompt] * len(images)
    elif all(c.is_file() for c in captions):
        prompt_of = [c.read_text(encoding="utf-8").strip() for c in captions]
    else:
        prompt_of = None
    # Images sharing a prompt form one group (so DIV is measured within a prompt, as the papers do).
    order: dict[str, list[Path]] = {}
    for i, path in enumerate(images):
        order.setdefault(prompt_of[i] if prompt_of else "", []).append(path)
    if prompt_of:
        groups = [(p, M.scoring_prompt(p, identifier, class_noun), paths) for p, paths in order.items()]
        rows = score_prompt_groups(groups, references, models)
    else:
        d = models.dino.embed_images(images, models.batch_size)
        c = models.clip.embed_images(images, models.batch_size)
        rows = [{"prompt": "(no prompt)", "dino": M.mean_pairwise_cosine(d, models.dino.embed_images(references, models.batch_size)),
                 "clip_i": M.mean_pairwise_cosine(c, models.clip.embed_images(references, models.batch_size)),
                 "div": M.mean_pairwise_distance(d) if len(images) > 1 else None}]
    # Per-prompt means weighted by image count give the mean over all images.
    counts = [len(order[r["prompt"] if prompt_of else ""]) for r in rows]
    summary = {}
    for key in ("dino", "clip_i", "clip_t", "clipscore"):
        if all(r.get(key) is not None for r in rows):
            summary[key] = float(np.average([r[key] for r in rows], weights=counts))
    divs = [r["div"] for r in rows if r.get("div") is not None]
    summary["div"] = float(np.mean(divs)) if divs else None
    notes = []
    if kid:
        out = M.kid_score(images, references, features=kid_features, model=kid_model, offline=offline, device=device)
        summary["kid"], summary["kid_std"] = out["kid"], out["kid_std"]
        notes.append(f"KID features: {out['note']}.")
    out_dir = Path(output_dir).expanduser() if output_dir else None
    for row in rows:
        paths = order[row["prompt"] if prompt_of else ""]
        row["images"] = [str(p.resolve()) for p in paths]
    result = {"title": f"{Path(images_dir).name} against {Path(references_dir).name}", "summary": summary,
              "models": models.describe(), "settings": {"images": len(images), "references": len(references)},
              "prompts": rows, "real_images": [str(p.resolve()) for p in references], "notes": notes}
    if out_dir is not None:
        write_reports(result, out_dir)
    return result


__all__ = ["EvalPrompt", "ImageCache", "ScoringModels", "evaluate_run", "score_folders", "score_prompt_groups"]
