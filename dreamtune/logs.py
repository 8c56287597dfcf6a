"""The run's metrics log (CSV) and its loss-curve PNG, drawn with PIL alone."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .io import save_image, write_text

# step_time: this step alone; wall_time: seconds since the (re)start of the loop, so its differences
# include everything between steps too (logging, checkpoints, validation).
FIELDS = ["step", "loss", "instance_loss", "prior_loss", "lr", "step_time", "wall_time"]


class MetricsLog:
    """Rows of step metrics in logs/metrics.csv; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = Path(path)
        self.rows: list[dict] = []
        if start_step and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f) if float(r["step"]) <= start_step]
        # Written whole once (atomically), then appended to a line per logged step.
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS)
        writer.writeheader()
        for row in self.rows:
            writer.writerow(self._format(row))
        write_text(self.path, buffer.getvalue())

    @staticmethod
    def _format(row: dict) -> dict:
        return {k: (int(v) if k == "step" else f"{v:.6g}") for k, v in row.items()}

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(self._format(row))

    def plot(self, path: Path) -> None:
        """Draw the loss (and its moving average) against the step into a PNG."""
        save_image(line_plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows], "loss"), path)


def line_plot(xs: list[float], ys: list[float], label: str, size=(640, 360)):
    """A small line chart (raw values light, moving average dark) as a PIL image."""
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, w - 20, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if not xs:
        draw.text((left + 10, top + 10), "no data", fill="black")
        return image
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def point(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    window = max(1, len(ys) // 20)
    smooth = [sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1]) for i in range(len(ys))]
    if len(xs) > 1:
        draw.line([point(x, y) for x, y in zip(xs, ys)], fill=(170, 190, 230), width=1)
        draw.line([point(x, y) for x, y in zip(xs, smooth)], fill=(20, 60, 160), width=2)
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        draw.text((4, point(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    draw.text((left, bottom + 8), f"step {x0:g}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {x1:g}", fill="black")
    draw.text((left + 8, top + 4), label, fill="black")
    return image


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' loading bars, notices and warnings (`-v` keeps them)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    try:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
