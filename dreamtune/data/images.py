"""Safe image loading: EXIF orientation, colour modes, size limits and errors that name the file."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# A decompression bomb is refused rather than decoded: 64 megapixels is far above any training image.
MAX_PIXELS = 64_000_000


def list_images(folder: str | Path, *, what: str = "instance_data_dir") -> list[Path]:
    """The image files of a folder, sorted by name; an error names the option when there are none."""
    folder = Path(folder).expanduser()
    if not str(folder) or not folder.exists():
        raise ImageError(f"{what}: folder '{folder}' does not exist. Point it at a folder of images.")
    if not folder.is_dir():
        raise ImageError(f"{what}: '{folder}' is a file, not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(
            f"{what}: no images in '{folder}' (looked for {', '.join(IMAGE_SUFFIXES)}). Add 3-5 photos of the subject."
        )
    return files


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit and float scaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if array.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied.

    Raises ImageError naming the file when it is empty, truncated, not an image, or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: the file is empty (0 bytes). Remove it or replace it with the image.")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {image.width}x{image.height} pixels is above the {MAX_PIXELS:,} pixel limit; downscale it first."
                    )
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses the largest images before their size can be read back: take it from its message.
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:,.0f} megapixels" if found else "too many pixels"
        raise ImageError(f"{path}: too large ({size}, limit {MAX_PIXELS / 1e6:,.0f}); downscale it first.") from None
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}). Remove it or use --skip-bad-images.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read the image ({e}). The file may be truncated or corrupt; remove it or use --skip-bad-images.") from None


def load_images(paths: list[Path], *, skip_bad_images: bool = False) -> list[tuple[Path, Image.Image]]:
    """Load several images; with `skip_bad_images` unreadable ones are skipped with a warning."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except ImageError as e:
            if not skip_bad_images:
                raise
            logger.warning("skipping %s", e)
    return loaded


def read_caption(image_path: Path) -> str | None:
    """The caption in a same-named .txt file beside an image, if there is one."""
    caption_path = image_path.with_suffix(".txt")
    if caption_path.is_file():
        text = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None
