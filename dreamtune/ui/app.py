"""The Gradio app: Train, Sample, Compare and Runs tabs over the same API and CLI as the terminal.

Training runs as a separate `dreamtune train` process (the command is shown); what the tabs show of
a run is read from its run folder. Sampling, export and merge call the library functions that the
`sample`, `export` and `merge` commands call.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..errors import DreamtuneError
from . import runs as R
from . import schema

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTION_SUFFIX = ".txt"
POLL_SECONDS = 2.0
# Small images (the shapes world draws at 32 px) are shown enlarged with sharp pixels.
CSS = "#dt-gallery img, #dt-grids img { image-rendering: pixelated; }"


def default_base() -> str:
    """The shipped shapes-world model: a newcomer can train on a laptop with nothing else."""
    from ..world import MODEL_DIR

    return str(MODEL_DIR)


def _message(text: str, kind: str = "error") -> str:
    mark = {"error": "**Error:**", "ok": "", "warn": "**Note:**"}[kind]
    return f"{mark} {text}".strip()


class Face:
    """The app's state and handlers; `build` lays the components out around them."""

    def __init__(self, root: str | Path, base: str | None = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = base or default_base()
        self.jobs = R.Jobs(self.root)
        self._pipe_key: tuple | None = None
        self._pipe = None
        self._identifiers: dict[str, list[str]] = {}
        self.advanced_names = [o.param for o in schema.advanced_options()]

    # ---- Train ----
    def identifiers(self, base: str, method: str) -> list[str]:
        """Rare single-token identifiers of the base model's tokenizer (`dreamtune tokens`)."""
        from ..methods import get_method

        if get_method(method).new_tokens:  # the method adds its own token, such as <new1>
            return ["<new1>"]
        if base not in self._identifiers:
            self._identifiers[base] = self._rare_tokens(base)
        return self._identifiers[base]

    @staticmethod
    def _rare_tokens(base: str) -> list[str]:
        try:
            from ..cli import _load_tokenizer
            from ..tokens import rare_tokens

            tokenizer = _load_tokenizer(base)
            if tokenizer is None:
                return ["sks"]
            return ["sks"] + [w for w, _ in rare_tokens(tokenizer, 12) if w != "sks"]
        except Exception:  # a base model that cannot be read yet: the Start button will say why
            return ["sks"]

    def save_uploads(self, name: str, files: list[str] | None) -> Path | None:
        """Copy uploaded files into <root>/uploads/<name>/, where they stay whatever happens next."""
        if not files:
            return None
        folder = self.root / R.UPLOADS / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            source = Path(f)
            shutil.copyfile(source, folder / source.name)
        strangers = [Path(f).name for f in files
                     if Path(f).suffix.lower() not in IMAGE_SUFFIXES + (CAPTION_SUFFIX,)]
        if strangers:
            raise DreamtuneError(f"{strangers[0]}: not an image (expected {', '.join(IMAGE_SUFFIXES)}; .txt files are "
                                 f"captions). Your uploads are kept in {folder}; remove that file and start again.")
        return folder

    def start(self, name: str, base: str, method: str, files: list[str] | None, folder: str, identifier: str,
              class_noun: str, steps: float, learning_rate: float, prior: bool, resolution: float,
              *advanced: Any) -> tuple[str, str, str]:
        """Start training: returns (message, command, run name)."""
        from ..config import load_config
        from ..data.concepts import load_concept

        name = R.check_run_name(name)
        run = self.root / name
        if run.exists() and any(run.iterdir()):
            raise DreamtuneError(f"run folder '{run}' is not empty: choose another run name, or resume that run "
                                 "from the Runs tab.")
        uploaded = self.save_uploads(name, files)
        instance_dir = str(uploaded) if uploaded else (folder or "").strip()
        if not instance_dir:
            raise DreamtuneError("no subject images: upload 3-5 images or give a folder of them.")
        main = {"pretrained_model_name_or_path": (base or "").strip() or self.base, "method": method,
                "output_dir": str(run), "max_train_steps": steps, "learning_rate": learning_rate,
                "with_prior_preservation": prior, "resolution": resolution, "instance_data_dir": instance_dir,
                "identifier": (identifier or "").strip(), "class_noun": (class_noun or "").strip()}
        values = dict(zip(self.advanced_names, advanced))
        argv = schema.train_argv(main, values, method=method)
        # The checks `dreamtune train` makes first, made here too so the message comes at once.
        config = load_config(None, overrides=[argv[i + 1] for i in range(0, len(argv) - 1) if argv[i] == "--set"])
        concept = load_concept(config.concepts[0], skip_bad_images=config.skip_bad_images)
        command = self.jobs.start(name, argv, method=method, total=config.max_train_steps)
        note = ""
        if len(concept.images) < 3:
            note = f" Only {len(concept.images)} image(s): 3-5 of the subject work best."
        return _message(f"Started run '{name}' in {run}.{note}", "ok"), command, name

    def stop(self, name: str) -> str:
        if not name:
            raise DreamtuneError("no run selected.")
        if not self.jobs.stop(name):
            return _message(f"run '{name}' is not running.", "warn")
        return _message(f"Stopping run '{name}': it finishes the current step, writes a checkpoint and stops; "
                        "Resume continues from there.", "ok")

    def resume(self, name: str) -> tuple[str, str]:
        if not name:
            raise DreamtuneError("no run selected.")
        command = self.jobs.resume(name)
        return _message(f"Resumed run '{name}'.", "ok"), command

    def poll(self, name: str):
        """(progress HTML, loss rows, validation grids, status line, log tail) of a run."""
        import pandas as pd

        empty = pd.DataFrame({"step": [], "loss": []})
        if not name:
            return "", empty, [], "", ""
        info = R.run_info(self.root, name)
        fraction = info.step / info.total if info.total else 0.0
        bar = (f"<div id='dt-progress' data-status='{info.status}' data-step='{info.step}'>"
               f"<progress value='{info.step}' max='{max(info.total, 1)}' style='width:100%'></progress>"
               f"<div>{html.escape(R.progress_text(info))} ({fraction:.0%})</div></div>")
        loss = pd.DataFrame({"step": [r["step"] for r in info.metrics], "loss": [r["loss"] for r in info.metrics]})
        grids = [(str(p), p.stem) for p in info.samples]
        status = f"**{info.status}**" + (f": {info.error}" if info.error else "")
        return bar, loss if len(loss) else empty, grids, status, self.jobs.log_tail(name)

    # ---- Sample ----
    def run_choices(self, finished_only: bool = True) -> list[str]:
        infos = R.list_runs(self.root)
        return [i.name for i in infos if i.status == "finished" or not finished_only]

    def _pipeline(self, base: str | None, weights: list[str]):
        from ..artifacts import find_artifact
        from ..pipeline import load_pipeline

        stamps = tuple((w, (find_artifact(w) / "dreamtune.json").stat().st_mtime) for w in weights)
        key = (base, stamps)
        if key != self._pipe_key:
            self._pipe, self._pipe_key = None, None
            self._pipe = load_pipeline(base, *weights)
            self._pipe_key = key
        return self._pipe

    def sample(self, run: str, artifact: str, base: str, prompt: str, negative: str, seed: float, count: float,
               steps: float, guidance: float) -> tuple[str, list, list[str]]:
        """Render a prompt with a run, an artifact folder or the base model alone."""
        from PIL.PngImagePlugin import PngInfo

        from ..pipeline import sample

        if not (prompt or "").strip():
            raise DreamtuneError("prompt is empty: write what to draw, e.g. 'a photo of a sks star'.")
        count, steps, seed = int(count), int(steps), int(seed)
        if count < 1 or steps < 1:
            raise DreamtuneError("count and steps must be at least 1.")
        weights = []
        if run and run != "(base model only)":
            weights.append(str(self.root / run))
        if (artifact or "").strip():
            weights.append(artifact.strip())
        base_model = (base or "").strip() or (None if weights else self.base)
        pipe = self._pipeline(base_model, weights)
        images = sample(pipe, prompt, num_images=count, seed=seed, steps=steps, guidance=float(guidance),
                        negative_prompt=(negative or None))
        out = self.root / R.UI_DIR / "samples" / time.strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        command = ["dreamtune", "sample", *(["--base", base_model] if base_model else []),
                   *[x for w in weights for x in ("--weights", w)], "--prompt", prompt,
                   *(["--negative-prompt", negative] if negative else []), "-n", str(count), "--seed", str(seed),
                   "--steps", str(steps), "--guidance", str(guidance)]
        import shlex

        paths = []
        for i, image in enumerate(images):
            settings = {"prompt": prompt, "negative_prompt": negative or "", "seed": seed + i, "steps": steps,
                        "guidance": float(guidance), "base": base_model or "", "weights": weights,
                        "command": shlex.join(command)}
            info = PngInfo()
            info.add_text("parameters", json.dumps(settings))
            path = out / f"{i:02d}-seed{seed + i}.png"
            image.save(path, pnginfo=info)
            paths.append(str(path))
        return f"`{shlex.join(command)}`", [(p, Path(p).stem) for p in paths], paths

    # ---- Compare / evaluate ----
    def is_world_run(self, name: str) -> bool:
        """True when a run's base model is the shipped shapes-world model (the oracle can read its images)."""
        from ..world import MODEL_DIR

        base = R.read_config_values(self.root / name).get("pretrained_model_name_or_path", "")
        try:
            return bool(base) and Path(base).expanduser().resolve() == MODEL_DIR.resolve()
        except OSError:
            return False

    def compare(self, names: list[str] | None, subject: str, images_per_prompt: float, dino: str, clip: str,
                offline: bool) -> tuple[str, list[list], str]:
        """Shapes-world runs: the demo's oracle table (base model vs each run). Other runs: `dreamtune eval`."""
        names = [n for n in (names or []) if n]
        if not names:
            raise DreamtuneError("compare: choose one or more finished runs.")
        world = [self.is_world_run(n) for n in names]
        if all(world):
            return self._oracle_table(names, subject, int(images_per_prompt))
        if any(world):
            raise DreamtuneError("compare: shapes-world runs (oracle table) and other runs (`dreamtune eval`) are "
                                 "compared separately; choose runs of one kind.")
        return self._evaluate(names[0], int(images_per_prompt), dino, clip, offline)

    def _oracle_table(self, names: list[str], subject_name: str, images_per_prompt: int):
        from ..artifacts import read_artifact
        from ..pipeline import load_pipeline
        from ..world import MODEL_DIR
        from ..world.demo import format_table, score_model
        from ..world.subjects import get_subject

        subject = get_subject(subject_name)
        rows = [score_model("base model", load_pipeline(str(MODEL_DIR)), subject, "sks", seed=0,
                            images_per_prompt=images_per_prompt)[0]]
        for name in names:
            info = read_artifact(self.root / name)
            identifier = (info.extra.get("concepts") or [{}])[0].get("identifier") or (info.tokens or ["sks"])[0]
            rows.append(score_model(name, load_pipeline(None, self.root / name), subject, identifier, seed=0,
                                    images_per_prompt=images_per_prompt)[0])
        table = [[r.name, round(r.subject_fidelity, 2), round(r.prompt_fidelity, 2), round(r.language_drift, 2),
                  round(r.class_diversity, 2)] for r in rows]
        text = format_table(rows)
        return (_message(f"Oracle scores on subject '{subject.name}' ({images_per_prompt} image(s) per prompt), "
                         "as `dreamtune demo` computes them.", "ok"), table, f"<pre>{html.escape(text)}</pre>")

    def _evaluate(self, name: str, images_per_prompt: int, dino: str, clip: str, offline: bool):
        from ..evaluate.runner import evaluate_run

        run = self.root / name
        result = evaluate_run(run, images_per_prompt=images_per_prompt, dino_model=(dino or None),
                              clip_model=(clip or None), offline=offline, progress=False)
        report = (run / "eval" / "report.html").read_text(encoding="utf-8")
        summary = result.get("summary", {})
        table = [[name, *[round(summary[k], 3) if isinstance(summary.get(k), float) else summary.get(k, "")
                          for k in ("dino", "clip_i", "clip_t", "div")]]]
        frame = (f"<iframe id='dt-report' srcdoc=\"{html.escape(report, quote=True)}\" "
                 "style='width:100%;height:900px;border:0'></iframe>")
        return (_message(f"`dreamtune eval {run} --images-per-prompt {images_per_prompt}`: reports in {run / 'eval'}",
                         "ok"), table, frame)

    # ---- Runs ----
    def runs_table(self) -> list[list]:
        # A merged artifact has no steps of its own.
        return [[i.name, i.status, i.method, f"{i.step}/{i.total}" if i.total else "", i.error]
                for i in R.list_runs(self.root)]

    def run_details(self, name: str):
        """(summary: progress, error and command; config text; loss plot path or None) of a run."""
        if not name:
            return "", "", None
        info = R.run_info(self.root, name)
        summary = R.progress_text(info) + (f"; error: {info.error}" if info.error else "")
        if info.command:
            summary += f"\n\n`{info.command}`"
        plot = info.path / "logs" / "loss.png"
        if not plot.is_file() and info.metrics:
            from ..logs import line_plot

            plot = self.root / R.UI_DIR / "plots" / f"{name}.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            line_plot([r["step"] for r in info.metrics], [r["loss"] for r in info.metrics], "loss").save(plot)
        return summary, info.config_text, str(plot) if plot.is_file() else None

    def export(self, name: str, fmt: str) -> tuple[str, str | None]:
        from ..artifacts import read_artifact
        from ..export import export

        if not name:
            raise DreamtuneError("no run selected.")
        info = read_artifact(self.root / name)
        out = self.root / R.UI_DIR / "exports" / f"{name}-{fmt}.safetensors"
        path = export(info, fmt, out, overwrite=True)
        return _message(f"Exported {name} as {fmt}: {path} (`dreamtune export {self.root / name} --format {fmt} "
                        f"--out {path}`)", "ok"), str(path)

    def merge(self, first: str, second: str, captions: str, name: str) -> str:
        from ..merge import merge

        if not first or not second:
            raise DreamtuneError("merge: choose two Custom Diffusion runs.")
        name = R.check_run_name(name)
        lines = [c.strip() for c in (captions or "").splitlines() if c.strip()]
        if not lines:
            raise DreamtuneError("merge: give regularisation captions, one per line (e.g. 'a photo of a star').")
        out = self.root / name
        if out.exists() and any(out.iterdir()):
            raise DreamtuneError(f"merge: '{out}' is not empty; choose another name.")
        merge([self.root / first, self.root / second], lines, out)
        return _message(f"Merged {first} and {second} into {out}; it is in the Sample tab's run list.", "ok")


def _guarded(fn, outputs: int, names: list[str] | None = None):
    """Run a handler; a user mistake becomes its one-line message in the first output, the rest unchanged.

    `names` names the handler's parameters (Gradio's API, and so gradio_client, uses them).
    """
    import functools
    import inspect

    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except (DreamtuneError, ConfigError) as e:
            message = _message(str(e))
            return message if outputs == 1 else (message, *[gr.update() for _ in range(outputs - 1)])

    if names is not None:
        wrapper.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return wrapper


def _component(gr, option: schema.Option, value: Any):
    default = "the method's" if option.default is None else schema.to_text(option.default)
    info = f"{option.help} (default: {default})"
    label = option.name
    if option.kind == "bool":
        return gr.Checkbox(value=bool(value), label=label, info=info)
    if option.kind == "choice":
        return gr.Dropdown(choices=list(option.choices), value=value, label=label, info=info)
    if option.kind in ("int", "float"):
        return gr.Number(value=value, label=label, info=info, precision=0 if option.kind == "int" else None)
    if option.kind == "list":
        return gr.Textbox(value=json.dumps(value), label=label, info=info + " A JSON list.")
    return gr.Textbox(value=value, label=label, info=info)


def build(root: str | Path = "runs", base: str | None = None):
    """The Gradio Blocks app for the runs under `root` (default base model: the shipped world model)."""
    import gradio as gr

    from ..methods import method_names

    face = Face(root, base)
    # Grouped by section for the panel; this order is also the order of the Start handler's arguments.
    listed = schema.advanced_options()
    advanced_options = [o for section in dict.fromkeys(o.section for o in listed) for o in listed
                        if o.section == section]
    face.advanced_names = [o.param for o in advanced_options]
    defaults = schema.method_defaults("dreambooth")
    with gr.Blocks(title="dreamtune", analytics_enabled=False) as app:
        gr.Markdown(f"# dreamtune\nRuns in `{face.root}`. Everything here is also a `dreamtune` command.")
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    run_name = gr.Textbox(value="my-subject", label="run name", info=f"folder under {face.root}",
                                          elem_id="dt-run-name")
                    base_box = gr.Textbox(value=face.base, label="base model",
                                          info="a diffusers folder, a hub id or a .safetensors file")
                    method = gr.Dropdown(choices=method_names(),
                                         value="dreambooth", label="method", elem_id="dt-method")
                with gr.Row():
                    files = gr.File(file_count="multiple", label="subject images (3-5)", elem_id="dt-files")
                    folder = gr.Textbox(value="", label="or a folder of images", placeholder="/path/to/photos")
                with gr.Row():
                    identifier = gr.Dropdown(choices=["sks"], value="sks",
                                             allow_custom_value=True, label="identifier",
                                             info="a rare single token (`dreamtune tokens --base ...`)")
                    class_noun = gr.Textbox(value="", label="class noun", placeholder="e.g. star, dog",
                                            elem_id="dt-class-noun")
                    steps = gr.Number(value=defaults["max_train_steps"], precision=0, label="steps",
                                      elem_id="dt-steps")
                    lr = gr.Number(value=defaults["learning_rate"], label="learning rate")
                    prior = gr.Checkbox(value=False, label="prior preservation")
                    resolution = gr.Number(value=32 if face.base == default_base() else defaults["resolution"],
                                           precision=0, label="resolution")
                with gr.Accordion("Advanced: every option of `dreamtune train`", open=False):
                    advanced = []
                    for section in dict.fromkeys(o.section for o in advanced_options):
                        gr.Markdown(f"**{section}**")
                        with gr.Row():
                            for o in (o for o in advanced_options if o.section == section):
                                advanced.append(_component(gr, o, defaults.get(o.param, o.default)))
                with gr.Row():
                    start_btn = gr.Button("Start", variant="primary", elem_id="dt-start")
                    stop_btn = gr.Button("Stop", elem_id="dt-stop")
                    resume_btn = gr.Button("Resume", elem_id="dt-resume")
                message = gr.Markdown(elem_id="dt-message")
                current = gr.Textbox(value="", label="run shown below", elem_id="dt-current",
                                     info="the run just started; type another run's name to watch it")
                command = gr.Code(label="the same run from a terminal", language="shell", interactive=False)
                progress = gr.HTML(elem_id="dt-progress-box")
                status = gr.Markdown(elem_id="dt-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="loss", label="loss", height=260)
                    grids = gr.Gallery(label="validation grids", columns=2, elem_id="dt-grids")
                log = gr.Textbox(label="training output", lines=6, max_lines=12)

                def on_method(m, base):
                    d = schema.method_defaults(m)
                    ids = face.identifiers(base, m)
                    return (gr.update(choices=ids, value=ids[0]), d["max_train_steps"], d["learning_rate"],
                            *[d.get(o.param, o.default) for o in advanced_options])

                method.change(on_method, [method, base_box], [identifier, steps, lr, *advanced], api_name=False)
                start_names = ["name", "base", "method", "files", "folder", "identifier", "class_noun", "steps",
                               "learning_rate", "prior", "resolution", *[o.param for o in advanced_options]]
                start_btn.click(_guarded(face.start, 3, start_names),
                                [run_name, base_box, method, files, folder, identifier, class_noun, steps, lr, prior,
                                 resolution, *advanced], [message, command, current], api_name="start")
                stop_btn.click(_guarded(face.stop, 1), [current], [message], api_name="stop")
                resume_btn.click(_guarded(face.resume, 2), [current], [message, command], api_name="resume")
                timer = gr.Timer(POLL_SECONDS)
                timer.tick(face.poll, [current], [progress, loss_plot, grids, status, log], api_name="poll",
                           show_progress="hidden", concurrency_limit=None)

            with gr.Tab("Sample", id="sample"):
                with gr.Row():
                    sample_run = gr.Dropdown(choices=["(base model only)", *face.run_choices()],
                                             value="(base model only)", label="run", elem_id="dt-sample-run",
                                             allow_custom_value=True)
                    refresh_runs = gr.Button("Refresh runs")
                    artifact = gr.Textbox(value="", label="or an artifact / run folder", placeholder="optional, applied after the run")
                    sample_base = gr.Textbox(value="", label="base model",
                                             info="empty: the run's own base (or the default base model)")
                prompt = gr.Textbox(value="a photo of a sks star", label="prompt", elem_id="dt-prompt")
                negative = gr.Textbox(value="", label="negative prompt")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed")
                    count = gr.Number(value=4, precision=0, label="images")
                    sample_steps = gr.Number(value=25, precision=0, label="steps")
                    guidance = gr.Number(value=3.0, label="guidance")
                sample_btn = gr.Button("Generate", variant="primary", elem_id="dt-generate")
                sample_msg = gr.Markdown(elem_id="dt-sample-message")
                gallery = gr.Gallery(label="samples (PNG with its settings)", columns=4, elem_id="dt-gallery",
                                     object_fit="contain")
                downloads = gr.File(label="download", file_count="multiple")
                sample_btn.click(_guarded(face.sample, 3),
                                 [sample_run, artifact, sample_base, prompt, negative, seed, count, sample_steps,
                                  guidance], [sample_msg, gallery, downloads], api_name="sample")
                refresh_runs.click(lambda: gr.update(choices=["(base model only)", *face.run_choices()]), None,
                                   [sample_run], api_name=False)

            with gr.Tab("Compare", id="compare"):
                from ..world import SUBJECTS

                gr.Markdown("Shapes-world runs are scored by the world's oracle against the base model, as "
                            "`dreamtune demo` does; other runs by `dreamtune eval` (DINO, CLIP-I, CLIP-T, DIV), "
                            "with its HTML report below.")
                with gr.Row():
                    compare_runs = gr.Dropdown(choices=face.run_choices(), multiselect=True, label="runs",
                                               allow_custom_value=True, elem_id="dt-compare-runs")
                    compare_refresh = gr.Button("Refresh runs")
                    subject_pick = gr.Dropdown(choices=sorted(SUBJECTS), value="striped_star",
                                               label="shapes-world subject the runs learned")
                    per_prompt = gr.Number(value=2, precision=0, label="images per prompt",
                                           elem_id="dt-compare-per-prompt")
                with gr.Accordion("`dreamtune eval` scoring models (runs on other base models)", open=False):
                    with gr.Row():
                        dino_box = gr.Textbox(value="", label="DINO model", info="empty: facebook/dino-vits16")
                        clip_box = gr.Textbox(value="", label="CLIP model", info="empty: openai/clip-vit-base-patch32")
                        offline_box = gr.Checkbox(value=False, label="offline (local folders only)")
                compare_btn = gr.Button("Compare", variant="primary", elem_id="dt-compare")
                compare_msg = gr.Markdown(elem_id="dt-compare-message")
                compare_table = gr.Dataframe(headers=["model", "subject fid. / DINO", "prompt fid. / CLIP-I",
                                                      "drift / CLIP-T", "class div. / DIV"],
                                             interactive=False, elem_id="dt-compare-table")
                compare_html = gr.HTML()
                compare_btn.click(_guarded(face.compare, 3),
                                  [compare_runs, subject_pick, per_prompt, dino_box, clip_box, offline_box],
                                  [compare_msg, compare_table, compare_html], api_name="compare")
                compare_refresh.click(lambda: gr.update(choices=face.run_choices()), None, [compare_runs],
                                      api_name=False)

            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    refresh = gr.Button("Refresh", elem_id="dt-refresh")
                runs_table = gr.Dataframe(headers=["run", "status", "method", "step", "error"],
                                          value=face.runs_table(), interactive=False, elem_id="dt-runs")
                selected = gr.Dropdown(choices=face.run_choices(False), label="run", elem_id="dt-selected",
                                       allow_custom_value=True)
                with gr.Row():
                    runs_stop = gr.Button("Stop")
                    runs_resume = gr.Button("Resume")
                    export_single = gr.Button("Export single file")
                    export_kohya = gr.Button("Export kohya LoRA")
                runs_msg = gr.Markdown()
                run_summary = gr.Markdown(elem_id="dt-run-summary")
                export_file = gr.File(label="exported file")
                with gr.Row():
                    config_view = gr.Code(label="config.toml", language=None, interactive=False, elem_id="dt-config")
                    loss_image = gr.Image(label="loss", type="filepath")
                with gr.Accordion("Merge two Custom Diffusion runs", open=False):
                    with gr.Row():
                        merge_a = gr.Dropdown(choices=face.run_choices(), label="first run", allow_custom_value=True)
                        merge_b = gr.Dropdown(choices=face.run_choices(), label="second run", allow_custom_value=True)
                        merge_name = gr.Textbox(value="", label="merged run name")
                    merge_captions = gr.Textbox(value="", lines=3, label="regularisation captions, one per line")
                    merge_btn = gr.Button("Merge")

                def on_refresh():
                    names = face.run_choices(False)
                    finished = face.run_choices()
                    return (face.runs_table(), gr.update(choices=names), gr.update(choices=finished),
                            gr.update(choices=finished))

                refresh.click(on_refresh, None, [runs_table, selected, merge_a, merge_b], api_name="runs")
                selected.change(face.run_details, [selected], [run_summary, config_view, loss_image],
                                api_name="run_details")
                runs_stop.click(_guarded(face.stop, 1), [selected], [runs_msg], api_name=False)
                runs_resume.click(_guarded(lambda n: face.resume(n)[0], 1), [selected], [runs_msg], api_name=False)
                export_single.click(_guarded(lambda n: face.export(n, "single-file"), 2), [selected],
                                    [runs_msg, export_file], api_name="export")
                export_kohya.click(_guarded(lambda n: face.export(n, "kohya"), 2), [selected],
                                   [runs_msg, export_file], api_name="export_kohya")
                merge_btn.click(_guarded(face.merge, 1), [merge_a, merge_b, merge_captions, merge_name], [runs_msg],
                                api_name="merge")
        # The rare-token list takes seconds to compute: it fills in once the page is open.
        app.load(lambda b, m: gr.update(choices=face.identifiers(b, m)), [base_box, method], [identifier],
                 api_name=False)
    app.face = face
    return app


def launch(root: str | Path = "runs", *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           base: str | None = None, block: bool = True):
    """Build the app and serve it; returns the app (with `block=False`, serving in the background)."""
    app = build(root, base)
    app.queue(default_concurrency_limit=1)
    face: Face = app.face
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
               ssr_mode=False, show_error=True, allowed_paths=[str(face.root)], footer_links=["api"], css=CSS)
    return app
