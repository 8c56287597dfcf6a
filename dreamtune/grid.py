"""Image grids with the prompt written above each row."""

from __future__ import annotations

from PIL import Image, ImageDraw


def image_grid(images: list, prompts: list[str], per_row: int, *, title: str = "", cell: int | None = None) -> Image.Image:
    """Lay images out one prompt per row (prompt-major order), prompts written in a band above each row."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cell = cell or max(images[0].width, 64)
    band = 14
    rows = (len(images) + per_row - 1) // per_row
    title_h = 16 if title else 0
    width = max(per_row * cell, 200)
    grid = Image.new("RGB", (width, title_h + rows * (cell + band)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, image in enumerate(images):
        r, c = divmod(i, per_row)
        y = title_h + r * (cell + band)
        if c == 0:
            label = prompts[r] if r < len(prompts) else ""
            draw.text((4, y + 1), label[: max(8, width // 6)], fill="black")
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y + band))
    return grid
