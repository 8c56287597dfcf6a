"""`dreamtune sample` into a folder: checked before the model loads, one writer, resumable.

The folder records its request in a hidden `.dreamtune-sample.json`. Rerunning the same request into the same folder
(after a kill, say) renders only what is missing. Images are rendered in fixed batches and each has
its own seed, so an image made on the rerun is the one an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from .errors import DreamtuneError
from .io import remove_leftovers, save_image, write_json
from .preflight import check_sample_request
from .runfolder import LOCK_FILE, FolderLock

logger = logging.getLogger(__name__)

# Hidden, so the folder lists the images and the grid alone.
SAMPLE_RECORD = ".dreamtune-sample.json"
GRID = "grid.png"
IMAGE_RE = re.compile(r"^prompt\d+-\d+\.png$")


def image_name(prompt_index: int, image_index: int) -> str:
    """The file name of image `image_index` of prompt `prompt_index`."""
    return f"prompt{prompt_index:02d}-{image_index:02d}.png"


def _own(path: Path) -> bool:
    return path.name in (SAMPLE_RECORD, GRID) or bool(IMAGE_RE.match(path.name))


def sample_to_folder(request: dict, out: str | Path, load: Callable[[], object], *, overwrite: bool = False,
                     batch_size: int = 8, progress: bool = True) -> tuple[list[Path], int]:
    """Render `request` (prompts, n, seed, steps, guidance, negative_prompt, height, width, ...) into `out`.

    `load` returns the pipeline; it is called only after every check passed. Returns the image paths
    and how many were rendered now. A folder holding another request needs `overwrite`.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from .grid import image_grid
    from .pipeline import render_jobs

    out = Path(out).expanduser()
    prompts, n = request["prompts"], request["n"]
    check_sample_request(num_images=n, steps=request["steps"], height=request.get("height"),
                         width=request.get("width"), out=str(out), prompts=prompts)
    with FolderLock(out / LOCK_FILE, f"--out '{out}'"):
        remove_leftovers(out)
        _claim(out, request, overwrite=overwrite)
        jobs = [(p, i) for p in prompts for i in range(n)]
        paths = [out / image_name(pi, i) for pi in range(len(prompts)) for i in range(n)]
        starts = [s for s in range(0, len(jobs), batch_size) if not all(p.exists() for p in paths[s : s + batch_size])]
        rendered = 0
        if starts:
            pipe = load()
            for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
                images = render_jobs(pipe, jobs[start : start + batch_size], seed=request["seed"],
                                     steps=request["steps"], guidance=request["guidance"],
                                     negative_prompt=request.get("negative_prompt"), height=request.get("height"),
                                     width=request.get("width"))
                for path, image in zip(paths[start : start + batch_size], images):
                    if not path.exists():
                        save_image(image, path)
                        rendered += 1
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        save_image(image_grid(images, prompts, n), out / GRID)
    return paths, rendered


def _claim(out: Path, request: dict, *, overwrite: bool) -> None:
    """Make `out` hold this request: new, the same request resumed, or (with overwrite) replaced."""
    contents = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    record = None
    if (out / SAMPLE_RECORD).is_file():
        try:
            record = json.loads((out / SAMPLE_RECORD).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            record = None
    if contents and overwrite:
        for path in contents:
            if _own(path):
                path.unlink()
    elif contents and record != request:
        if record is None:
            raise DreamtuneError(f"--out '{out}' is not empty: pass --overwrite or choose another folder.")
        differ = sorted(k for k in set(record) | set(request) if record.get(k) != request.get(k))
        raise DreamtuneError(
            f"--out '{out}' holds the images of another request (different {', '.join(differ)}): pass --overwrite "
            "to replace them, or choose another folder."
        )
    elif contents:
        logger.info("%s: finishing the images an earlier run of the same request did not write", out)
    write_json(out / SAMPLE_RECORD, request)
