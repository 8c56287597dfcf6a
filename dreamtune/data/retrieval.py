"""Real regularisation images: the captioned images of a local collection whose captions are closest to a prompt.

Custom Diffusion regularises with about 200 real images whose captions resemble the class prompt
("a photo of a dog"). The LAION retrieval service the paper's scripts call no longer answers, so
this ranks a collection you have: a folder of images with same-named .txt captions, or a CSV or
JSONL file of (path, caption) rows. Captions are embedded with a CLIP text model (the base model's
own text encoder by default: its pooled end-of-text feature; or a CLIP model folder, projected
feature) and ranked by cosine similarity to the prompt. The chosen images are copied with their
captions into `out_dir` together with `retrieval.json` (scores) and `captions.txt`; point a
concept's `class_data_dir` at it and training uses those captions as the prior prompts.

Caption embeddings are computed in batches and cached per text model (safetensors, keyed by a hash
of each caption), so ranking the same collection again, or a grown one, only embeds what is new.

Command line: `dreamtune retrieve --class-prompt "a photo of a dog" --collection PATH -n 200 --out DIR`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DreamtuneError, first_line
from ..io import require_empty
from .images import IMAGE_SUFFIXES, load_image, read_caption

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "url")
CAPTION_COLUMNS = ("caption", "text", "prompt", "title")


class RetrievalError(DreamtuneError):
    """A collection or text model that cannot be used for retrieval."""


@dataclass
class Item:
    """One image of a collection and its caption."""

    path: Path
    caption: str


@dataclass
class RetrievalResult:
    """What `retrieve` returns. `out_dir` is None when there was no collection (class images are generated)."""

    out_dir: Path | None
    chosen: list[dict] = field(default_factory=list)
    candidates: int = 0
    generated_fallback: bool = False


# --- collections ----------------------------------------------------------------------------
def read_collection(collection: str | os.PathLike) -> list[Item]:
    """The (image, caption) items of a folder with .txt captions, a CSV file or a JSONL file.

    CSV files need a header naming a path column (path, image, file, ...) and a caption column
    (caption, text, ...); JSONL rows are objects with the same keys. Relative paths are relative to
    the file's folder. Images without a caption are skipped.
    """
    path = Path(collection).expanduser()
    if not path.exists():
        raise RetrievalError(f"--collection '{path}': no such file or folder. Give a folder of images with .txt "
                             "captions, or a .csv/.jsonl file of path,caption rows.")
    if path.is_dir():
        items, uncaptioned = [], 0
        for image in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            caption = read_caption(image)
            if caption:
                items.append(Item(image, caption))
            else:
                uncaptioned += 1
        if uncaptioned:
            logger.warning("%s: %d images have no .txt caption and are left out", path, uncaptioned)
        if not items:
            raise RetrievalError(f"--collection '{path}': no images with same-named .txt captions.")
        return items
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    else:
        raise RetrievalError(f"--collection '{path}': expected a folder, a .csv or a .jsonl file.")
    items = []
    for line, row in rows:
        key_path = next((k for k in PATH_COLUMNS if row.get(k)), None)
        key_caption = next((k for k in CAPTION_COLUMNS if row.get(k)), None)
        if key_path is None or key_caption is None:
            raise RetrievalError(f"{path}:{line}: a row needs a path ({'/'.join(PATH_COLUMNS[:3])}) and a caption "
                                 f"({'/'.join(CAPTION_COLUMNS[:2])}).")
        image = Path(str(row[key_path])).expanduser()
        items.append(Item(image if image.is_absolute() else path.parent / image, str(row[key_caption]).strip()))
    if not items:
        raise RetrievalError(f"--collection '{path}': no rows.")
    return items


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise RetrievalError(f"{path}: empty CSV file.")
        fields = {name.strip().lower() for name in reader.fieldnames if name}
        if not fields & set(PATH_COLUMNS) or not fields & set(CAPTION_COLUMNS):
            raise RetrievalError(f"{path}: the CSV header must name a path column ({', '.join(PATH_COLUMNS[:3])}) "
                                 f"and a caption column ({', '.join(CAPTION_COLUMNS[:2])}); it has {', '.join(reader.fieldnames)}.")
        return [(i + 2, {(k or "").strip().lower(): v for k, v in row.items()}) for i, row in enumerate(reader)]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RetrievalError(f"{path}:{i}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict):
            raise RetrievalError(f"{path}:{i}: each line must be a JSON object with path and caption.")
        rows.append((i, {str(k).lower(): v for k, v in row.items()}))
    return rows


# --- text embeddings ------------------------------------------------------------------------
class TextEmbedder:
    """CLIP text features: the pooled end-of-text feature, projected when the model has a projection."""

    def __init__(self, tokenizer, model, key: str, device: str | torch.device = "cpu"):
        self.tokenizer, self.model, self.key, self.device = tokenizer, model.to(device).eval(), key, device

    @classmethod
    def load(cls, text_model: str | None = None, base: str | None = None, device: str = "cpu") -> TextEmbedder:
        """The text model at `text_model` (a CLIP folder or a diffusers pipeline folder), else `base`'s encoder."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        source = text_model or base
        if not source:
            raise RetrievalError("retrieve: give --base (its text encoder ranks the captions) or --text-model.")
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise RetrievalError(f"'{source}': not a folder. --text-model takes a CLIP model folder; --base a "
                                 "diffusers model folder.")
        if (folder / "model_index.json").is_file():
            tok_dir, model_dir, projected = folder / "tokenizer", folder / "text_encoder", False
        else:
            tok_dir, model_dir, projected = folder, folder, True
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            config = json.loads((model_dir / "config.json").read_text())
            kwargs = {}
            if projected and "text_config" in config:
                # A full CLIP model: its text half, with the projection width of the whole model.
                from transformers import CLIPTextConfig

                text_config = CLIPTextConfig(**{k: v for k, v in config["text_config"].items() if k != "model_type"})
                text_config.projection_dim = config.get("projection_dim", text_config.projection_dim)
                kwargs["config"] = text_config
            has_projection = projected and _has_projection(model_dir)
            model_class = CLIPTextModelWithProjection if has_projection else CLIPTextModel
            model = model_class.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise RetrievalError(f"'{source}': cannot load a CLIP text model and tokenizer ({first_line(e)}).") from None
        return cls(tokenizer, model, model_key(model_dir, type(model).__name__), device)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Unit-length float32 features, one row per text."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                               return_tensors="pt").to(self.device)
        out = self.model(**batch)
        features = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def _has_projection(model_dir: Path) -> bool:
    """True when the saved weights include CLIP's text projection (a config alone may name one it lacks)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return (model_dir / "config.json").is_file() and "text_config" in (model_dir / "config.json").read_text()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if any(key.endswith("text_projection.weight") for key in f.keys()):
                return True
    return False


def model_key(model_dir: Path, kind: str) -> str:
    """A key for a text model's cache: its resolved path, kind, and its weight files' sizes and times."""
    model_dir = Path(model_dir).resolve()
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()
                   if p.suffix in (".safetensors", ".bin"))
    blob = json.dumps([str(model_dir), kind, stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def caption_hash(caption: str) -> bytes:
    """16 bytes that identify a caption in the embedding cache."""
    return hashlib.sha256(caption.encode("utf-8")).digest()[:16]


def embed_captions(embedder: TextEmbedder, captions: list[str], *, cache_dir: Path | None,
                   batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Features of `captions` (rows in order), from the cache where present; new ones are added to it."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from ..io import save_safetensors

    cache_file = cache_dir / f"text-{embedder.key}.safetensors" if cache_dir else None
    known: dict[bytes, int] = {}
    cached = None
    if cache_file is not None and cache_file.is_file():
        try:
            stored = load_file(cache_file)
            cached = stored["embeddings"]
            known = {bytes(h.tolist()): i for i, h in enumerate(stored["hashes"])}
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            logger.warning("%s: unreadable embedding cache (%s); recomputing", cache_file, e)
            known, cached = {}, None
    hashes = [caption_hash(c) for c in captions]
    todo = sorted({h: c for h, c in zip(hashes, captions) if h not in known}.items())
    new_rows: list[torch.Tensor] = []
    bar = tqdm(total=len(todo), desc="embedding captions", unit="caption", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        new_rows.append(embedder([c for _, c in chunk]))
        bar.update(len(chunk))
    bar.close()
    if new_rows:
        fresh = torch.cat(new_rows)
        base = cached.shape[0] if cached is not None else 0
        known.update({h: base + i for i, (h, _) in enumerate(todo)})
        cached = fresh if cached is None else torch.cat([cached, fresh])
        if cache_file is not None:
            all_hashes = sorted(known.items(), key=lambda kv: kv[1])
            hash_tensor = torch.tensor([list(h) for h, _ in all_hashes], dtype=torch.uint8)
            save_safetensors({"embeddings": cached, "hashes": hash_tensor}, cache_file, {"model": embedder.key})
    return cached[torch.tensor([known[h] for h in hashes], dtype=torch.long)]


# --- retrieval ------------------------------------------------------------------------------
def retrieve(class_prompt: str, collection: str | os.PathLike | None, n: int = 200,
             out_dir: str | os.PathLike = "retrieved", text_model: str | None = None, threshold: float | None = None,
             *, base: str | None = None, batch_size: int = 256, cache: bool = True, device: str = "cpu",
             progress: bool = True) -> RetrievalResult:
    """Copy the `n` images of `collection` whose captions are most similar to `class_prompt` into `out_dir`.

    Similarity is the cosine of CLIP text features (`text_model`, else `base`'s text encoder). With
    `threshold`, only captions at least that similar are taken (fewer than `n` then, with a
    warning). Unreadable images are skipped for the next best. `out_dir` is written whole or not at
    all: images 00000.<ext> with 00000.txt captions, `captions.txt` and `retrieval.json`. With no
    collection nothing is written: the caller's class images are generated by the base model.
    """
    from ..io import atomic_dir, write_json, write_text
    from .priors import cache_dir

    if not collection:
        logger.warning("retrieve: no collection given, so no real images: class images for '%s' will be generated by "
                       "the base model (leave class_data_dir empty, or point it at an empty folder).", class_prompt)
        return RetrievalResult(None, generated_fallback=True)
    if n < 1:
        raise RetrievalError(f"-n {n}: the number of images must be at least 1.")
    items = read_collection(collection)
    embedder = TextEmbedder.load(text_model, base, device)
    features = embed_captions(embedder, [it.caption for it in items],
                              cache_dir=cache_dir() / "retrieval" if cache else None,
                              batch_size=batch_size, progress=progress)
    query = embedder([class_prompt])[0]
    scores = features @ query
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    chosen: list[tuple[Item, float]] = []
    seen: set[Path] = set()
    skipped = 0
    for index in order:
        if len(chosen) >= n:
            break
        score = float(scores[index])
        if threshold is not None and score < threshold:
            break
        item = items[index]
        if item.path.resolve() in seen:
            continue
        try:
            load_image(item.path)
        except DreamtuneError as e:
            skipped += 1
            logger.warning("skipping %s", e)
            continue
        seen.add(item.path.resolve())
        chosen.append((item, score))
    if skipped:
        logger.warning("retrieve: %d unreadable images skipped", skipped)
    if len(chosen) < n:
        reason = f"above the threshold {threshold}" if threshold is not None else "readable"
        logger.warning("retrieve: only %d of the %d requested images are %s", len(chosen), n, reason)
    if not chosen:
        raise RetrievalError(f"retrieve: no image of '{collection}' qualifies"
                             + (f" (best similarity {float(scores.max()):.3f} < threshold {threshold})" if threshold is not None else "")
                             + ".")
    out_dir = Path(out_dir).expanduser()
    records = []
    with atomic_dir(out_dir) as tmp:
        for rank, (item, score) in enumerate(chosen):
            name = f"{rank:05d}{item.path.suffix.lower()}"
            shutil.copyfile(item.path, tmp / name)
            write_text(tmp / f"{rank:05d}.txt", item.caption + "\n")
            records.append({"rank": rank, "file": name, "source": str(item.path), "caption": item.caption,
                            "similarity": round(score, 6)})
        write_text(tmp / "captions.txt", "\n".join(item.caption for item, _ in chosen) + "\n")
        write_json(tmp / "retrieval.json", {"class_prompt": class_prompt, "collection": str(collection),
                                            "text_model": text_model or base, "model_key": embedder.key,
                                            "requested": n, "threshold": threshold, "candidates": len(items),
                                            "images": records})
    logger.info("retrieve: %d images for '%s' in %s (similarity %.3f to %.3f)", len(chosen), class_prompt, out_dir,
                chosen[0][1], chosen[-1][1])
    return RetrievalResult(out_dir, records, len(items))


# --- command line ---------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add `dreamtune retrieve` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "retrieve", help="pick real regularisation images from a local captioned collection",
        description="Rank a local collection of captioned images by how close each caption is to the class prompt "
                    "(cosine similarity of CLIP text features) and copy the best into a folder to use as "
                    "class_data_dir. Its captions become the prior prompts.")
    p.add_argument("--class-prompt", required=True, help='e.g. "a photo of a dog"')
    p.add_argument("--collection", default=None,
                   help="folder of images with same-named .txt captions, or a .csv/.jsonl of path,caption rows; "
                        "without one, class images are generated at training time instead")
    p.add_argument("-n", "--num-images", dest="n", type=int, default=200, help="images to keep (default 200)")
    p.add_argument("--out", required=True, help="output folder (use it as the concept's class_data_dir)")
    p.add_argument("--base", help="diffusers model whose text encoder ranks the captions")
    p.add_argument("--text-model", help="a CLIP model folder to rank with instead of the base's text encoder")
    p.add_argument("--threshold", type=float, default=None, help="keep only captions at least this similar (-1..1)")
    p.add_argument("--batch-size", type=int, default=256, help="captions embedded at once (default 256)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the caption-embedding cache")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_retrieve)


def cmd_retrieve(args) -> int:
    """Handler of `dreamtune retrieve`."""
    out = require_empty(args.out, overwrite=args.overwrite)
    result = retrieve(args.class_prompt, args.collection, args.n, out, text_model=args.text_model,
                      threshold=args.threshold, base=args.base, batch_size=args.batch_size, cache=not args.no_cache)
    if result.generated_fallback:
        print(f"no --collection: no real images. Training will generate class images for '{args.class_prompt}' with "
              f"the base model (set class_data_dir = '{out}' to keep them there).")
        return 0
    print(f"{len(result.chosen)} of {result.candidates} images -> {result.out_dir} "
          f"(similarity {result.chosen[0]['similarity']:.3f} .. {result.chosen[-1]['similarity']:.3f}); "
          f"set class_data_dir = '{result.out_dir}' in the concept.")
    return 0
