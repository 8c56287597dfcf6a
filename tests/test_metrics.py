"""The evaluation metrics on tiny random DINO/CLIP models loaded through the real from_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreamtune.errors import DreamtuneError, ModelLoadError
from dreamtune.evaluate import metrics
from dreamtune.evaluate.tiny_models import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return str(save_tiny_dino(tmp_path_factory.mktemp("dino")))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def _image(seed: int, size=(40, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth colour fields plus noise: distinct images whose features really differ.
    base = rng.integers(0, 256, size=(3,))
    array = np.clip(base + rng.normal(0, 60, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def images():
    return [_image(i, size=(40 + 3 * i, 36 + 2 * i)) for i in range(7)]


def _ref_pixels(image: Image.Image, size: int, mean, std, resample, crop: bool) -> torch.Tensor:
    image = image.convert("RGB")
    if crop:
        w, h = image.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        image = image.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), resample)
    a = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@torch.no_grad()
def _ref_dino(dino_dir, images) -> np.ndarray:
    from transformers import ViTModel

    model = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    rows = [model(pixel_values=_ref_pixels(im, 32, metrics.IMAGENET_MEAN, metrics.IMAGENET_STD, Image.BILINEAR, False)[None])
            .last_hidden_state[0, 0].numpy() for im in images]
    return _unit(np.stack(rows).astype(np.float64))


@torch.no_grad()
def _ref_clip(clip_dir, images, prompts):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    img = []
    for im in images:
        px = _ref_pixels(im, 32, metrics.CLIP_MEAN, metrics.CLIP_STD, Image.BICUBIC, True)[None]
        out = model.get_image_features(pixel_values=px)
        img.append((out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy())
    txt = []
    for p in prompts:
        ids = tok([p], return_tensors="pt")
        out = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        txt.append((out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy())
    return _unit(np.stack(img).astype(np.float64)), _unit(np.stack(txt).astype(np.float64))


def test_identical_images_score_one(dino_dir, clip_dir, images):
    a = images[0]
    assert metrics.dino_score([a], [a], model=dino_dir) == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_i_score([a, a.copy()], [a], model=clip_dir) == pytest.approx(1.0, abs=1e-6)
    assert metrics.dino_score(images[:3], images[3:], model=dino_dir) < 0.9999


def test_dino_and_clip_match_a_direct_computation(dino_dir, clip_dir, images):
    gen, real = images[:4], images[4:]
    d = _ref_dino(dino_dir, images)
    assert metrics.dino_score(gen, real, model=dino_dir) == pytest.approx(float((d[:4] @ d[4:].T).mean()), abs=1e-5)

    prompts = ["a red dog", "a dog in the snow", "a dog on a beach", "a photo of a dog"]
    ci, ct = _ref_clip(clip_dir, images, prompts)
    assert metrics.clip_i_score(gen, real, model=clip_dir) == pytest.approx(float((ci[:4] @ ci[4:].T).mean()), abs=1e-5)
    cos = np.einsum("nd,nd->n", ci[:4], ct)
    assert metrics.clip_t_score(gen, prompts, model=clip_dir) == pytest.approx(float(cos.mean()), abs=1e-5)
    assert metrics.clipscore(gen, prompts, model=clip_dir) == pytest.approx(float((2.5 * np.maximum(cos, 0)).mean()), abs=1e-5)


def test_scores_do_not_depend_on_batch_size_or_order(dino_dir, clip_dir, images):
    gen, real = images[:5], images[5:]
    prompts = [f"a dog number {i}" for i in range(5)]
    perm = [3, 0, 4, 1, 2]
    for fn, model in ((metrics.dino_score, dino_dir), (metrics.clip_i_score, clip_dir)):
        base = fn(gen, real, model=model, batch_size=1)
        assert fn(gen, real, model=model, batch_size=4) == pytest.approx(base, abs=1e-6)
        assert fn([gen[i] for i in perm], real[::-1], model=model, batch_size=3) == pytest.approx(base, abs=1e-6)
    base = metrics.clip_t_score(gen, prompts, model=clip_dir, batch_size=1)
    shuffled = metrics.clip_t_score([gen[i] for i in perm], [prompts[i] for i in perm], model=clip_dir, batch_size=5)
    assert shuffled == pytest.approx(base, abs=1e-6)
    # A prompt's embedding must not change with the other prompts of its batch.
    emb = metrics.load_embedder("clip", clip_dir)
    alone = emb.embed_texts(["a dog number 1"])
    together = emb.embed_texts(["a much longer prompt about a dog sitting in the snow", "a dog number 1"])
    np.testing.assert_allclose(alone[0], together[1], atol=1e-6)


def test_tensor_array_and_path_inputs_match_pil(dino_dir, images, tmp_path):
    im = images[1]
    as_array = np.array(im)
    as_tensor = torch.from_numpy(as_array).permute(2, 0, 1).float() / 255.0
    im.save(tmp_path / "x.png")
    emb = metrics.load_embedder("dino", dino_dir)
    ref = emb.embed_images([im])
    for other in (as_array, as_tensor, tmp_path / "x.png", str(tmp_path / "x.png")):
        np.testing.assert_allclose(emb.embed_images([other]), ref, atol=1e-5)
    np.testing.assert_allclose(emb.embed_images(as_tensor[None].repeat(2, 1, 1, 1)), np.repeat(ref, 2, 0), atol=1e-5)


def test_processor_config_is_followed(tmp_path, images):
    folder = save_tiny_dino(tmp_path / "dino_proc")
    plain = metrics.DinoEmbedder(str(folder), device="cpu").embed_images(images[:2])
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std, "resample": 3, "size": 32}))
    emb = metrics.DinoEmbedder(str(folder), device="cpu")
    assert emb.preprocessing.mean == mean and emb.preprocessing.resample == Image.BICUBIC
    assert not np.allclose(emb.embed_images(images[:2]), plain)


def _kid_reference(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel, written as loops."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(0.5, 1.0, size=(6, 5))
    kid, std = metrics.kid_from_features(x, y, num_subsets=10, subset_size=100)
    assert kid == pytest.approx(_kid_reference(x, y), rel=1e-10)
    assert std == 0.0
    # The diagonal is excluded: including it (the biased estimate) gives another number.
    d = x.shape[1]
    biased = ((x @ x.T / d + 1) ** 3).mean() + ((y @ y.T / d + 1) ** 3).mean() - 2 * ((x @ y.T / d + 1) ** 3).mean()
    assert abs(biased - kid) > 1e-3


def test_kid_subsets_are_order_free_and_separate_distributions():
    rng = np.random.default_rng(1)
    same_a, same_b = rng.normal(size=(60, 8)), rng.normal(size=(50, 8))
    shifted = rng.normal(1.0, 1.0, size=(50, 8))
    near, _ = metrics.kid_from_features(same_a, same_b, num_subsets=20, subset_size=20)
    far, _ = metrics.kid_from_features(same_a, shifted, num_subsets=20, subset_size=20)
    assert far > near + 0.1 and abs(near) < 0.1
    perm = rng.permutation(60)
    again, _ = metrics.kid_from_features(same_a[perm], same_b[::-1], num_subsets=20, subset_size=20)
    assert again == pytest.approx(near, abs=1e-12)
    # Each subset value is the same unbiased estimate computed on that subset.
    one, _ = metrics.kid_from_features(same_a[:20], same_b[:20], num_subsets=1, subset_size=20)
    assert one == pytest.approx(_kid_reference(same_a[:20], same_b[:20]), rel=1e-9)
    with pytest.raises(DreamtuneError, match="at least two"):
        metrics.kid_from_features(same_a[:1], same_b, subset_size=5)


def test_kid_score_says_which_features(dino_dir, clip_dir, images):
    out = metrics.kid_score(images[:4], images[4:], features="clip", model=clip_dir)
    assert out["features"] == f"clip ({clip_dir})" and np.isfinite(out["kid"])
    emb = metrics.load_embedder("dino", dino_dir)
    out = metrics.kid_score(images[:4], images[4:], features=emb)
    assert out["features"].startswith("dino")
    with pytest.raises(DreamtuneError, match="--kid-features"):
        metrics.kid_score(images[:4], images[4:], features="vgg")


def test_pres_div_and_real_upper_bound(dino_dir, clip_dir, images):
    assert metrics.pres_score(images[:3], images[3:], model=dino_dir) == pytest.approx(
        metrics.dino_score(images[:3], images[3:], model=dino_dir))
    same = [images[0], images[0].copy(), images[0].copy()]
    assert metrics.div_score({"p": same}, model=dino_dir) == pytest.approx(0.0, abs=1e-6)
    d = _ref_dino(dino_dir, images)
    expected = np.mean([1 - (d[0] @ d[1]), np.mean([1 - d[2] @ d[3], 1 - d[2] @ d[4], 1 - d[3] @ d[4]])])
    assert metrics.div_score([[images[0], images[1]], images[2:5], [images[6]]], model=dino_dir) == pytest.approx(expected, abs=1e-5)
    real = metrics.real_image_scores(images[:4], dino=dino_dir, clip=clip_dir)
    sims = d[:4] @ d[:4].T
    assert real["dino"] == pytest.approx((sims.sum() - np.trace(sims)) / 12, abs=1e-5)
    with pytest.raises(DreamtuneError, match="two real images"):
        metrics.real_image_scores(images[:1], dino=dino_dir, clip=clip_dir)


def test_scoring_prompt_replaces_the_identifier():
    assert metrics.scoring_prompt("a sks dog in the snow", "sks", "dog") == "a dog in the snow"
    assert metrics.scoring_prompt("a photo of <new1>", "<new1>", "cat") == "a photo of cat"
    assert metrics.scoring_prompt("a <new1> cat wearing a hat", "<new1>", "cat") == "a cat wearing a hat"
    assert metrics.scoring_prompt("sksx dog and a sks dog", "sks", "dog") == "sksx dog and a dog"


def test_load_errors_name_the_model_and_the_fix(tmp_path, clip_dir):
    with pytest.raises(ModelLoadError, match="no such folder.*--dino-model"):
        metrics.load_embedder("dino", str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="'nobody-here/no-such-clip'.*local folder with --clip-model"):
        metrics.load_embedder("clip", "nobody-here/no-such-clip", offline=True)
    with pytest.raises(ModelLoadError, match="'clip' model, not a ViT"):
        metrics.load_embedder("dino", clip_dir)
    with pytest.raises(ModelLoadError, match="--kid-model"):
        metrics.load_embedder("inception", str(tmp_path / "missing.safetensors"))


def test_missing_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_dino(tmp_path / "dino_cut")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "encoder.layer.1." not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="weights missing"):
        metrics.DinoEmbedder(str(folder), device="cpu")
