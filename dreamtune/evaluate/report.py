"""Evaluation reports: metrics.json, a markdown table and a self-contained HTML page.

A result is a plain dict (what `evaluate_run` and `dreamtune metrics` return):

    {"title": str, "summary": {metric: value}, "models": {name: description},
     "settings": {...}, "prompts": [{"prompt": str, "images": [path], metric: value, ...}],
     "real_images": [path], "notes": [str]}

Image paths inside a result are relative to the report folder (or absolute). The HTML embeds a
small JPEG thumbnail of every image, so the page can be mailed alone, and links each thumbnail to
the full image by its relative path. Every file is written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..io import write_json, write_text

# (key, column title, what it measures): the order the tables use.
METRICS = (
    ("dino", "DINO", "subject fidelity: DINO similarity to the real images (higher is closer)"),
    ("clip_i", "CLIP-I", "subject fidelity: CLIP image similarity to the real images"),
    ("clip_t", "CLIP-T", "prompt fidelity: CLIP similarity of image and prompt (identifier replaced by the class)"),
    ("clipscore", "CLIPScore", "2.5 x max(CLIP-T cosine, 0), as Custom Diffusion reports it"),
    ("div", "DIV", "diversity: mean 1 - DINO cosine among the images of one prompt (higher is more diverse)"),
    ("pres", "PRES", "prior preservation: DINO similarity of class-prompt images to the subject (lower is less drift)"),
    ("kid", "KID", "kernel inception distance to the real images (lower is closer); features named below"),
)
_TITLES = {key: title for key, title, _ in METRICS}


def fmt(value, digits: int = 3) -> str:
    """A metric value as the tables print it ('-' when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _present(rows: Sequence[dict], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if any(r.get(k) is not None for r in rows)]


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], digits: int = 3) -> str:
    """A markdown table of `rows` (dicts) with `columns` as (key, title) pairs."""
    out = ["| " + " | ".join(title for _, title in columns) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        cells = [fmt(row.get(key), digits).replace("|", "\\|") for key, _ in columns]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def text_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], digits: int = 3) -> str:
    """A plain fixed-width table for the terminal."""
    cells = [[title for _, title in columns]] + [[fmt(r.get(k), digits) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, rows: Sequence[dict], fields: Sequence[str]) -> None:
    """Write rows as CSV atomically (missing values left empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    write_text(path, buffer.getvalue())


def markdown_report(result: dict) -> str:
    """The result as markdown: the summary, then one row per prompt."""
    lines = [f"# {result.get('title', 'Evaluation')}", ""]
    for key, value in result.get("settings", {}).items():
        lines.append(f"- {key}: {value}")
    for key, value in result.get("models", {}).items():
        lines.append(f"- {key} model: {value}")
    lines.append("")
    summary = result.get("summary", {})
    keys = [k for k, _, _ in METRICS if summary.get(k) is not None]
    if keys:
        lines += ["## Summary", "", markdown_table([summary], [(k, _TITLES[k]) for k in keys]), ""]
    prompts = result.get("prompts", [])
    prompt_keys = _present(prompts, [k for k, _, _ in METRICS])
    if prompts:
        columns = [("prompt", "Prompt")] + [(k, _TITLES[k]) for k in prompt_keys]
        lines += ["## Per prompt", "", markdown_table(prompts, columns), ""]
    extra = result.get("class_prompt")
    if extra:
        lines += [f"Class prompt \"{extra.get('prompt', '')}\": PRES {fmt(extra.get('pres'))}.", ""]
    notes = list(result.get("notes", []))
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Metrics", ""] + [f"- {title}: {help_}" for key, title, help_ in METRICS if key in keys or key in prompt_keys]
    return "\n".join(lines).rstrip() + "\n"


def _thumbnail_uri(path: Path, size: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_html(path: str, out_dir: Path, embed: bool, size: int) -> str:
    full = Path(path) if Path(path).is_absolute() else out_dir / path
    href = path if not Path(path).is_absolute() else os.path.relpath(full, out_dir)
    href = Path(href).as_posix()
    src = _thumbnail_uri(full, size) if embed else None
    name = html.escape(Path(path).name)
    if src is None:
        src = href
    return f'<a href="{html.escape(href)}"><img src="{src}" alt="{name}" title="{name}"></a>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px}.grid img{width:160px;height:160px;object-fit:cover;image-rendering:auto}
section{margin:1.5em 0;padding-top:0.5em;border-top:1px solid #eee}.scores{color:#555;font-size:0.9em}
.note{color:#555;font-size:0.9em}
"""


def html_report(result: dict, out_dir: str | os.PathLike, *, embed_images: bool = True, thumbnail_size: int = 256) -> str:
    """The result as one HTML page: summary table, the real images, then one image grid per prompt."""
    out_dir = Path(out_dir)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(result.get('title', 'Evaluation'))}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(result.get('title', 'Evaluation'))}</h1>"]
    info = [(k, v) for k, v in result.get("settings", {}).items()] + [(f"{k} model", v) for k, v in result.get("models", {}).items()]
    if info:
        parts.append("<ul>" + "".join(f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in info) + "</ul>")
    summary = result.get("summary", {})
    keys = [k for k, _, _ in METRICS if summary.get(k) is not None]
    if keys:
        parts.append("<h2>Summary</h2><table><tr>" + "".join(f"<th title='{esc(h)}'>{t}</th>" for k, t, h in METRICS if k in keys) + "</tr><tr>"
                     + "".join(f"<td>{fmt(summary[k])}</td>" for k in keys) + "</tr></table>")
    for note in result.get("notes", []):
        parts.append(f"<p class='note'>{esc(str(note))}</p>")
    real = result.get("real_images", [])
    if real:
        parts.append("<h2>Real images</h2><div class='grid'>" + "".join(_image_html(p, out_dir, embed_images, thumbnail_size) for p in real) + "</div>")
    for entry in result.get("prompts", []):
        scores = ", ".join(f"{_TITLES[k]} {fmt(entry[k])}" for k, _, _ in METRICS if entry.get(k) is not None)
        scored = entry.get("scoring_prompt")
        scored_html = f" <span class='note'>(scored as &ldquo;{esc(scored)}&rdquo;)</span>" if scored and scored != entry.get("prompt") else ""
        parts.append(f"<section><h3>{esc(str(entry.get('prompt', '')))}{scored_html}</h3><p class='scores'>{esc(scores)}</p><div class='grid'>"
                     + "".join(_image_html(p, out_dir, embed_images, thumbnail_size) for p in entry.get("images", [])) + "</div></section>")
    extra = result.get("class_prompt")
    if extra:
        parts.append(f"<section><h3>Class prompt: {esc(str(extra.get('prompt', '')))}</h3><p class='scores'>PRES {fmt(extra.get('pres'))}"
                     " (DINO similarity of these images to the subject; lower means less drift)</p><div class='grid'>"
                     + "".join(_image_html(p, out_dir, embed_images, thumbnail_size) for p in extra.get("images", [])) + "</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_reports(result: dict, out_dir: str | os.PathLike, *, embed_images: bool = True, thumbnail_size: int = 256) -> dict[str, Path]:
    """Write metrics.json, report.md and report.html into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "metrics.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], result)
    write_text(paths["markdown"], markdown_report(result))
    write_text(paths["html"], html_report(result, out_dir, embed_images=embed_images, thumbnail_size=thumbnail_size))
    return paths
