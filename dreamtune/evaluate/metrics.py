"""The papers' metrics: DINO, CLIP-I, CLIP-T (and CLIPScore), KID, PRES and DIV.

Every metric is a function of images (PIL images, file paths, numpy arrays or tensors) and, for
CLIP-T, prompts. The feature models are loaded with the real `from_pretrained` from a hub id or a
local folder and kept in a small cache, so scoring many runs loads each model once.

Definitions (as DreamBooth and Custom Diffusion report them):

- DINO: mean cosine similarity over every (generated, real) pair of the CLS token of the last
  layer (after the final layer norm) of a ViT-S/16 trained with DINO (`facebook/dino-vits16`).
- CLIP-I: the same with CLIP's projected image embeddings (`openai/clip-vit-base-patch32`).
- CLIP-T: mean cosine similarity between each generated image's CLIP embedding and the CLIP text
  embedding of its prompt, with the identifier replaced by the class noun (`scoring_prompt`).
  CLIPScore is Hessel et al.'s w * max(cos, 0) with w = 2.5, averaged the same way.
- KID: the unbiased MMD^2 estimate with the kernel k(x, y) = (x.y / d + 1)^3 between generated and
  real features, averaged over random subsets (Binkowski et al.). Features: Inception pool features
  when its weights and `timm` are available, else DINO or CLIP embeddings; the result says which.
  KID values from different features are not comparable with each other.
- PRES (DreamBooth's prior-preservation ablation): the DINO score between images rendered for the
  plain class prompt and the subject's real images. Lower means the class drifted less toward the
  subject.
- DIV: for each prompt, the mean over pairs of its images of 1 - cosine similarity of their DINO
  CLS embeddings; averaged over prompts. Higher means more diverse. (DreamBooth used LPIPS here;
  DINO distance is a feature-space stand-in with the same direction, not the same scale.)

Images are resized and normalised with PIL and numpy following the model's own
`preprocessor_config.json` (mean, std, resampling, centre crop) at the model's input size, so no
torchvision is needed. Embeddings are computed in float32 in eval mode and normalised; a score does
not depend on the batch size or on the order of the images.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DreamtuneError, ModelLoadError, first_line
from ..io import looks_local

logger = logging.getLogger(__name__)

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_INCEPTION_MODEL = "timm/inception_v3.tv_in1k"
CLIPSCORE_WEIGHT = 2.5
KID_FEATURES = ("auto", "inception", "dino", "clip")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Which CLI option sets each model, so a load error can say what to pass.
_OPTION = {"dino": "--dino-model", "clip": "--clip-model", "inception": "--kid-model"}
_WHAT = {"dino": "DINO", "clip": "CLIP", "inception": "Inception"}

ImageLike = Any  # PIL.Image, str/Path of an image file, HWC numpy array, CHW/HWC tensor


# ---------------------------------------------------------------------------------------------
# images -> model inputs


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize (and maybe centre crop) to `size`, then normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.BICUBIC
    center_crop: bool = True

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A CHW float32 array for one RGB image."""
        if self.center_crop:
            # Shortest edge to `size`, then the centre square: CLIP's processor.
            w, h = image.size
            scale = self.size / min(w, h)
            new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((new_w, new_h), resample=self.resample)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            # Straight to size x size: ViT's (and DINO's) processor.
            image = image.resize((self.size, self.size), resample=self.resample)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))


def to_pil(image: ImageLike) -> Image.Image:
    """Any supported image input as an RGB PIL image.

    Accepts PIL images, image file paths, numpy arrays (HWC, uint8 0-255 or float 0-1) and
    tensors (CHW or HWC, uint8 0-255 or float 0-1, as diffusers' `output_type="pt"` gives).
    """
    from ..data.images import load_image, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().to("cpu")
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        image = tensor.float().numpy() if tensor.dtype != torch.uint8 else tensor.numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = np.clip(np.asarray(array, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return to_rgb(Image.fromarray(array))
    raise DreamtuneError(f"cannot score an image of type {type(image).__name__}: give PIL images, file paths, arrays or tensors.")


def as_image_list(images: ImageLike | Iterable[ImageLike]) -> list:
    """A list of image inputs; a 4-D tensor or array counts as a batch of images."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (Image.Image, str, os.PathLike, torch.Tensor, np.ndarray)):
        return [images]
    return list(images)


# ---------------------------------------------------------------------------------------------
# loading feature models


def _offline(offline: bool) -> bool:
    return bool(offline) or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _load_error(kind: str, model_id: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load the {_WHAT[kind]} model '{model_id}' ({reason}). Download it (e.g. `hf download {model_id}`) "
        f"and pass its local folder with {_OPTION[kind]} PATH."
    )


def _check_local(kind: str, model_id: str) -> str:
    if not model_id:
        raise _load_error(kind, model_id, "no model given")
    if looks_local(model_id):
        path = Path(model_id).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{_WHAT[kind]} model '{model_id}': no such folder. Pass a folder holding the model with {_OPTION[kind]} PATH.")
        return str(path)
    return model_id


def _read_processor_config(model_id: str, offline: bool) -> dict:
    """The model's preprocessor_config.json as a dict, or {} when it has none."""
    path = Path(model_id).expanduser()
    try:
        if path.is_dir():
            file = path / "preprocessor_config.json"
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_id, "preprocessor_config.json", local_files_only=offline)).read_text(encoding="utf-8"))
    except Exception as e:  # a model without a processor config still works with the defaults
        logger.debug("no preprocessor config for %s: %s", model_id, e)
        return {}


def _preprocessing(processor: dict, image_size: int, mean, std, resample: int, center_crop: bool) -> Preprocessing:
    size = processor.get("size")
    if processor:
        center_crop = bool(processor.get("do_center_crop", False)) or (isinstance(size, dict) and "shortest_edge" in size)
    return Preprocessing(
        size=int(image_size),
        mean=tuple(float(v) for v in processor.get("image_mean", mean)),
        std=tuple(float(v) for v in processor.get("image_std", std)),
        resample=int(processor.get("resample", resample)),
        center_crop=center_crop,
    )


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_loading_info(kind: str, model_id: str, info: dict, allowed_missing: tuple[str, ...] = ()) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(allowed_missing)] if info else []
    if missing:
        # transformers fills missing weights with random ones: scores from them would be noise.
        raise _load_error(kind, model_id, f"{len(missing)} weights missing from the checkpoint, e.g. '{missing[0]}'")


class ImageEmbedder:
    """A frozen image model that turns images into L2-normalised feature vectors."""

    kind = ""
    model_id = ""

    def __init__(self, model, preprocessing: Preprocessing, device: str):
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=torch.float32)
        self.preprocessing = preprocessing
        self.device = device

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Normalised embeddings, one float64 row per image, computed in batches of `batch_size`."""
        from tqdm.auto import tqdm

        images = as_image_list(images)
        rows = []
        for start in tqdm(range(0, len(images), batch_size), desc=f"{self.kind} features", disable=not progress, leave=False):
            chunk = [self.preprocessing(to_pil(im)) for im in images[start : start + batch_size]]
            pixels = torch.from_numpy(np.stack(chunk)).to(self.device)
            rows.append(self._forward(pixels).float().cpu().numpy().astype(np.float64))
        if not rows:
            return np.zeros((0, 0))
        return normalize(np.concatenate(rows))

    def describe(self) -> str:
        """The feature and model, as the reports print it: e.g. 'dino (facebook/dino-vits16)'."""
        return f"{self.kind} ({self.model_id})"


class DinoEmbedder(ImageEmbedder):
    """DINO ViT features: the CLS token of the last layer, after the final layer norm."""

    kind = "dino"

    def __init__(self, model_id: str = DEFAULT_DINO_MODEL, *, offline: bool = False, device: str | None = None):
        from transformers import AutoConfig, AutoModel, ViTModel

        offline = _offline(offline)
        source = _check_local("dino", model_id)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=offline)
            if config.model_type == "vit":
                model, info = ViTModel.from_pretrained(source, local_files_only=offline, add_pooling_layer=False, output_loading_info=True)
            elif config.model_type == "dinov2":
                model, info = AutoModel.from_pretrained(source, local_files_only=offline, output_loading_info=True)
            else:
                raise _load_error("dino", model_id, f"it is a '{config.model_type}' model, not a ViT")
        except ModelLoadError:
            raise
        except Exception as e:
            raise _load_error("dino", model_id, first_line(e, 200)) from None
        _check_loading_info("dino", model_id, info, ("pooler",))
        processor = _read_processor_config(source, offline)
        preprocessing = _preprocessing(processor, config.image_size, IMAGENET_MEAN, IMAGENET_STD, Image.BILINEAR, center_crop=False)
        self.model_id = model_id
        super().__init__(model, preprocessing, device or _default_device())

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder(ImageEmbedder):
    """CLIP's projected image and text embeddings (the space CLIP-I and CLIP-T are measured in)."""

    kind = "clip"

    def __init__(self, model_id: str = DEFAULT_CLIP_MODEL, *, offline: bool = False, device: str | None = None):
        from transformers import AutoConfig, CLIPModel, CLIPTokenizer

        from ..assets import CLIP_TOKENIZER_DIR

        offline = _offline(offline)
        source = _check_local("clip", model_id)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=offline)
            if config.model_type != "clip":
                raise _load_error("clip", model_id, f"it is a '{config.model_type}' model, not CLIP")
            model, info = CLIPModel.from_pretrained(source, local_files_only=offline, output_loading_info=True)
        except ModelLoadError:
            raise
        except Exception as e:
            raise _load_error("clip", model_id, first_line(e, 200)) from None
        _check_loading_info("clip", model_id, info)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=offline)
        except Exception:
            # Every OpenAI CLIP shares one BPE vocabulary; the shipped copy stands in for a folder without it.
            if config.text_config.vocab_size != 49408:
                raise _load_error("clip", model_id, "no tokenizer files beside the model") from None
            tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)
        self.tokenizer = tokenizer
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), config.text_config.max_position_embeddings)
        processor = _read_processor_config(source, offline)
        preprocessing = _preprocessing(processor, config.vision_config.image_size, CLIP_MEAN, CLIP_STD, Image.BICUBIC, center_crop=True)
        self.model_id = model_id
        super().__init__(model, preprocessing, device or _default_device())

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def embed_texts(self, prompts: str | Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised text embeddings, one float64 row per prompt (padded to a fixed length)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for start in range(0, len(prompts), batch_size):
            # Fixed-length padding keeps a prompt's embedding independent of its batch.
            tokens = self.tokenizer(prompts[start : start + batch_size], padding="max_length", truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            out = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                               attention_mask=tokens.attention_mask.to(self.device))
            rows.append(_pooled(out).float().cpu().numpy().astype(np.float64))
        if not rows:
            return np.zeros((0, 0))
        return normalize(np.concatenate(rows))


class InceptionEmbedder(ImageEmbedder):
    """Inception-v3 pool features (2048-d) through `timm`, for KID as image-generation papers report it.

    Needs the `timm` package and the weights: a timm hub id (default `timm/inception_v3.tv_in1k`) or
    a local .safetensors file of timm's `inception_v3`. These ImageNet weights are close to, but not
    the same as, the TensorFlow FID Inception, so values differ slightly from FID-toolkit KIDs.
    """

    kind = "inception"

    def __init__(self, model_id: str = DEFAULT_INCEPTION_MODEL, *, offline: bool = False, device: str | None = None):
        try:
            import timm
        except ImportError:
            raise _load_error("inception", model_id, "the timm package is not installed; pip install timm") from None
        offline = _offline(offline)
        path = Path(model_id).expanduser()
        try:
            if offline and not looks_local(model_id):
                # timm has no offline switch of its own: take the weights file from the local hub cache.
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(model_id, "model.safetensors", local_files_only=True))
            if path.is_file():
                model = timm.create_model("inception_v3", pretrained=True, num_classes=0,
                                          pretrained_cfg_overlay={"file": str(path)})
            elif looks_local(model_id):
                raise _load_error("inception", model_id, "no such file")
            else:
                model = timm.create_model(f"hf-hub:{model_id}", pretrained=True, num_classes=0)
        except ModelLoadError:
            raise
        except Exception as e:
            raise _load_error("inception", model_id, first_line(e, 200)) from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = int((cfg.get("input_size") or (3, 299, 299))[-1])
        preprocessing = Preprocessing(size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                                      resample=Image.BILINEAR, center_crop=False)
        self.model_id = model_id
        super().__init__(model, preprocessing, device or _default_device())

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


_EMBEDDERS = {"dino": DinoEmbedder, "clip": ClipEmbedder, "inception": InceptionEmbedder}
_DEFAULT_IDS = {"dino": DEFAULT_DINO_MODEL, "clip": DEFAULT_CLIP_MODEL, "inception": DEFAULT_INCEPTION_MODEL}
_CACHE: dict[tuple, ImageEmbedder] = {}


def load_embedder(kind: str, model_id: str | None = None, *, offline: bool = False, device: str | None = None) -> ImageEmbedder:
    """Load (once; later calls reuse it) the 'dino', 'clip' or 'inception' feature model.

    `model_id` is a hub id or a local folder (default: the papers' model). `offline=True` (or
    HF_HUB_OFFLINE=1) only looks in the local cache. A model that cannot be loaded raises
    ModelLoadError naming it and the option that takes a local path.
    """
    if kind not in _EMBEDDERS:
        raise DreamtuneError(f"unknown feature model kind '{kind}': use one of {', '.join(_EMBEDDERS)}.")
    model_id = str(model_id or _DEFAULT_IDS[kind])
    device = device or _default_device()
    key = (kind, model_id, _offline(offline), device)
    if key not in _CACHE:
        _CACHE[key] = _EMBEDDERS[kind](model_id, offline=offline, device=device)
    return _CACHE[key]


def _embedder(model: str | ImageEmbedder | None, kind: str, offline: bool, device: str | None) -> ImageEmbedder:
    if isinstance(model, ImageEmbedder):
        return model
    return load_embedder(kind, model, offline=offline, device=device)


# ---------------------------------------------------------------------------------------------
# similarity arithmetic on embeddings


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64)."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def mean_pairwise_cosine(a: np.ndarray, b: np.ndarray, exclude_diagonal: bool = False) -> float:
    """Mean cosine similarity over all pairs (row of a, row of b).

    `exclude_diagonal=True` (a and b the same set) leaves out each row paired with itself.
    """
    sims = normalize(a) @ normalize(b).T
    if exclude_diagonal:
        n = sims.shape[0]
        if n < 2:
            raise DreamtuneError("need at least two images to compare a set with itself.")
        return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
    return float(sims.mean())


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean of 1 - cosine similarity over the distinct pairs of rows (0 for fewer than two rows)."""
    n = len(features)
    if n < 2:
        return 0.0
    return 1.0 - mean_pairwise_cosine(features, features, exclude_diagonal=True)


def _need(images: list, what: str) -> list:
    if not images:
        raise DreamtuneError(f"no {what} to score.")
    return images


# ---------------------------------------------------------------------------------------------
# the metrics


def dino_score(generated, real, *, model: str | ImageEmbedder | None = None, offline: bool = False,
               device: str | None = None, batch_size: int = 32) -> float:
    """DINO subject fidelity: mean cosine similarity of DINO CLS embeddings over (generated, real) pairs."""
    embedder = _embedder(model, "dino", offline, device)
    gen = embedder.embed_images(_need(as_image_list(generated), "generated images"), batch_size)
    ref = embedder.embed_images(_need(as_image_list(real), "real images"), batch_size)
    return mean_pairwise_cosine(gen, ref)


def clip_i_score(generated, real, *, model: str | ImageEmbedder | None = None, offline: bool = False,
                 device: str | None = None, batch_size: int = 32) -> float:
    """CLIP-I subject fidelity: mean cosine similarity of CLIP image embeddings over (generated, real) pairs."""
    embedder = _embedder(model, "clip", offline, device)
    gen = embedder.embed_images(_need(as_image_list(generated), "generated images"), batch_size)
    ref = embedder.embed_images(_need(as_image_list(real), "real images"), batch_size)
    return mean_pairwise_cosine(gen, ref)


def _broadcast_prompts(prompts: str | Sequence[str], n: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise DreamtuneError(f"CLIP-T needs one prompt per image (or one for all): got {len(prompts)} prompts for {n} images.")
    return prompts


def clip_t_cosines(images, prompts: str | Sequence[str], *, model: str | ImageEmbedder | None = None,
                   offline: bool = False, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """Per-image cosine similarity between each image's CLIP embedding and its prompt's."""
    embedder = _embedder(model, "clip", offline, device)
    images = _need(as_image_list(images), "generated images")
    prompts = _broadcast_prompts(prompts, len(images))
    image_features = embedder.embed_images(images, batch_size)
    unique = sorted(set(prompts))
    text = dict(zip(unique, embedder.embed_texts(unique)))
    return np.einsum("nd,nd->n", image_features, np.stack([text[p] for p in prompts]))


def clip_t_score(images, prompts: str | Sequence[str], *, model: str | ImageEmbedder | None = None,
                 offline: bool = False, device: str | None = None, batch_size: int = 32) -> float:
    """CLIP-T prompt fidelity: mean cosine similarity between each image and its prompt in CLIP space.

    Give the prompts as the class would read them (`scoring_prompt` replaces the identifier by the
    class noun), one per image or one for all.
    """
    return float(clip_t_cosines(images, prompts, model=model, offline=offline, device=device, batch_size=batch_size).mean())


def clipscore(images, prompts: str | Sequence[str], *, model: str | ImageEmbedder | None = None,
              offline: bool = False, device: str | None = None, batch_size: int = 32) -> float:
    """CLIPScore (Hessel et al.): mean of 2.5 * max(cos, 0) between each image and its prompt."""
    return clipscore_of(clip_t_cosines(images, prompts, model=model, offline=offline, device=device,
                                       batch_size=batch_size))


def clipscore_of(cosines: np.ndarray) -> float:
    """CLIPScore from image-prompt cosine similarities: the mean of 2.5 * max(cos, 0)."""
    return float((CLIPSCORE_WEIGHT * np.maximum(cosines, 0.0)).mean())


def scoring_prompt(prompt: str, identifier: str, class_noun: str) -> str:
    """The prompt as CLIP-T reads it: '<identifier> <class>' (or a lone identifier) becomes the class noun.

    'a sks dog in the snow' -> 'a dog in the snow'; 'a photo of <new1>' with class 'cat' -> 'a photo of cat'.
    """
    import re

    if not identifier:
        return prompt
    pattern = r"(?<![\w<])" + re.escape(identifier) + r"(?![\w>])"
    if class_noun:
        pattern += r"(?:\s+" + re.escape(class_noun) + r"(?!\w))?"
    return re.sub(r"\s{2,}", " ", re.sub(pattern, class_noun, prompt)).strip()


def _canonical_order(features: np.ndarray) -> np.ndarray:
    # Sort rows so that random subsets (and so KID) do not depend on the order the images came in.
    rounded = np.round(features, 5)
    return features[np.lexsort(rounded.T[::-1])]


def kid_from_features(generated: np.ndarray, real: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Unbiased KID (mean, std over subsets) between two feature matrices.

    Kernel k(x, y) = (x.y / d + 1)^3. Each subset draws m = min(subset_size, n_generated, n_real)
    rows of each set without replacement; when m covers both sets there is one subset (all rows).
    MMD^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.
    """
    x = _canonical_order(np.asarray(generated, dtype=np.float64))
    y = _canonical_order(np.asarray(real, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DreamtuneError(f"KID needs two feature matrices of the same width; got {x.shape} and {y.shape}.")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise DreamtuneError(f"KID needs at least two generated and two real images; got {len(x)} and {len(y)}.")
    d = x.shape[1]
    if m == len(x) == len(y):
        num_subsets = 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        xs = x[rng.choice(len(x), m, replace=False)] if m < len(x) else x
        ys = y[rng.choice(len(y), m, replace=False)] if m < len(y) else y
        k_xx = (xs @ xs.T / d + 1.0) ** 3
        k_yy = (ys @ ys.T / d + 1.0) ** 3
        k_xy = (xs @ ys.T / d + 1.0) ** 3
        mmd = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2.0 * k_xy.mean()
        values.append(mmd)
    values = np.asarray(values)
    return float(values.mean()), float(values.std())


def resolve_kid_features(features: str = "auto", model: str | None = None, *, offline: bool = False,
                         device: str | None = None) -> tuple[ImageEmbedder, str]:
    """The embedder KID uses and a note on why: 'auto' tries Inception (timm) and falls back to DINO."""
    if features not in KID_FEATURES:
        raise DreamtuneError(f"--kid-features: unknown '{features}'; use one of {', '.join(KID_FEATURES)}.")
    if features != "auto":
        embedder = load_embedder(features, model, offline=offline, device=device)
        return embedder, f"{embedder.describe()} as asked"
    try:
        embedder = load_embedder("inception", model if model else None, offline=offline, device=device)
        return embedder, f"{embedder.describe()}"
    except ModelLoadError as e:
        embedder = load_embedder("dino", None, offline=offline, device=device)
        return embedder, f"{embedder.describe()}, because Inception is not available: {e}"


def kid_score(generated, real, *, features: str | ImageEmbedder = "auto", model: str | None = None,
              num_subsets: int = 100, subset_size: int = 1000, seed: int = 0, offline: bool = False,
              device: str | None = None, batch_size: int = 32) -> dict:
    """KID between generated and real images on a chosen feature model.

    `features`: 'auto' (Inception when timm and its weights are there, else DINO), 'inception',
    'dino', 'clip', or a loaded embedder; `model` overrides that feature's model id. Returns
    {'kid', 'kid_std', 'features', 'note'}; 'features' names the feature model used.
    """
    if isinstance(features, ImageEmbedder):
        embedder, note = features, features.describe()
    else:
        embedder, note = resolve_kid_features(features, model, offline=offline, device=device)
    gen = embedder.embed_images(_need(as_image_list(generated), "generated images"), batch_size)
    ref = embedder.embed_images(_need(as_image_list(real), "real images"), batch_size)
    mean, std = kid_from_features(gen, ref, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    return {"kid": mean, "kid_std": std, "features": embedder.describe(), "note": note}


def pres_score(class_images, real_images, *, model: str | ImageEmbedder | None = None, offline: bool = False,
               device: str | None = None, batch_size: int = 32) -> float:
    """PRES (prior preservation): DINO score between class-prompt images and the subject's real images.

    Render the plain class prompt ('a dog') with the fine-tuned model; lower means less of the
    subject leaked into the class.
    """
    return dino_score(class_images, real_images, model=model, offline=offline, device=device, batch_size=batch_size)


def div_score(images_by_prompt: dict | Sequence, *, model: str | ImageEmbedder | None = None, offline: bool = False,
              device: str | None = None, batch_size: int = 32) -> float:
    """DIV (diversity): mean over prompts of the mean 1 - cosine distance of DINO embeddings among that prompt's images.

    `images_by_prompt`: {prompt: images} or a list of image groups; groups of fewer than two
    images are skipped. Higher means more diverse.
    """
    groups = list(images_by_prompt.values()) if isinstance(images_by_prompt, dict) else list(images_by_prompt)
    groups = [as_image_list(g) for g in groups]
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        raise DreamtuneError("DIV needs at least one prompt with two or more images.")
    embedder = _embedder(model, "dino", offline, device)
    return float(np.mean([mean_pairwise_distance(embedder.embed_images(g, batch_size)) for g in groups]))


def real_image_scores(real_images, *, dino: str | ImageEmbedder | None = None, clip: str | ImageEmbedder | None = None,
                      offline: bool = False, device: str | None = None, batch_size: int = 32) -> dict:
    """The 'Real images' upper bound: each real image scored against the subject's other real images.

    Mean over ordered pairs of distinct images of the DINO and CLIP-I similarity (needs two or more).
    """
    images = as_image_list(real_images)
    if len(images) < 2:
        raise DreamtuneError("the real-image upper bound needs at least two real images of the subject.")
    d = _embedder(dino, "dino", offline, device).embed_images(images, batch_size)
    c = _embedder(clip, "clip", offline, device).embed_images(images, batch_size)
    return {"dino": mean_pairwise_cosine(d, d, exclude_diagonal=True), "clip_i": mean_pairwise_cosine(c, c, exclude_diagonal=True)}
