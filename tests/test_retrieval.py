"""Real regularisation images from a local captioned collection, ranked by CLIP text similarity."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dreamtune.data.retrieval import RetrievalError, read_collection, retrieve

CAPTIONS = ["a photo of a dog", "a dog on the beach", "a small brown dog running", "a red house at night",
            "two cats on a sofa", "a bowl of fruit", "a dog", "a city street in the rain", "a photo of a cat",
            "mountains under snow"]


@pytest.fixture
def collection(tmp_path):
    folder = tmp_path / "collection"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (20 + i, 16), (25 * i, 100, 200 - 10 * i)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(caption + "\n")
    Image.new("RGB", (8, 8)).save(folder / "uncaptioned.png")
    return folder


def _cosines(model_dir, prompt, captions):
    """The similarities computed directly: the base text encoder's pooled features, cosine."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    model = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")).eval()
    with torch.no_grad():
        feats = model(**tok([prompt] + captions, padding=True, return_tensors="pt")).pooler_output
    feats = torch.nn.functional.normalize(feats, dim=-1)
    return (feats[1:] @ feats[0]).tolist()


def test_retrieve_ranks_by_text_similarity_and_writes_a_class_folder(collection, tiny_model_dir, tmp_path):
    from dreamtune.config import ConceptConfig
    from dreamtune.data.priors import has_captions, load_class_images

    out = tmp_path / "reg"
    result = retrieve("a photo of a dog", collection, n=4, out_dir=out, base=str(tiny_model_dir), progress=False)
    report = json.loads((out / "retrieval.json").read_text())
    images = report["images"]
    assert [r["rank"] for r in images] == [0, 1, 2, 3] and result.candidates == len(CAPTIONS)
    assert images[0]["caption"] == "a photo of a dog" and images[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    expected = sorted(zip(_cosines(tiny_model_dir, "a photo of a dog", CAPTIONS), CAPTIONS), reverse=True)[:4]
    assert [r["caption"] for r in images] == [c for _, c in expected]
    assert [r["similarity"] for r in images] == pytest.approx([s for s, _ in expected], abs=1e-5)
    for r in images:
        source = collection / r["source"].rsplit("/", 1)[-1]
        assert (out / r["file"]).read_bytes() == source.read_bytes()
        assert (out / r["file"]).with_suffix(".txt").read_text().strip() == r["caption"]
    assert (out / "captions.txt").read_text().splitlines() == [r["caption"] for r in images]

    # Training reads the folder as real class images, with the captions as the prior prompts.
    assert has_captions(out)
    prior = load_class_images(out, ConceptConfig(class_noun="dog").class_prompt_text, 4)
    assert prior.prompts == [r["caption"] for r in images]


def test_threshold_batches_and_cache(collection, tiny_model_dir, tmp_path, monkeypatch):
    from dreamtune.data import retrieval

    monkeypatch.setenv("DREAMTUNE_CACHE", str(tmp_path / "cache"))  # start with no cached embeddings
    calls = []
    original = retrieval.TextEmbedder.__call__

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(retrieval.TextEmbedder, "__call__", counting)
    first = retrieve("a photo of a dog", collection, n=10, out_dir=tmp_path / "a", base=str(tiny_model_dir),
                     batch_size=3, progress=False)
    assert calls == [3, 3, 3, 1, 1]  # ten captions in batches of three, then the prompt
    calls.clear()
    second = retrieve("a photo of a dog", collection, n=10, out_dir=tmp_path / "b", base=str(tiny_model_dir),
                      progress=False)
    assert calls == [1]  # every caption came from the cache
    assert [r["similarity"] for r in second.chosen] == [r["similarity"] for r in first.chosen]

    threshold = first.chosen[2]["similarity"] - 1e-7
    calls.clear()
    kept = retrieve("a photo of a dog", collection, n=10, out_dir=tmp_path / "c", base=str(tiny_model_dir),
                    threshold=threshold, progress=False)
    assert len(kept.chosen) == 3 and all(r["similarity"] >= threshold for r in kept.chosen)
    with pytest.raises(RetrievalError, match="threshold"):
        retrieve("a photo of a dog", collection, n=3, out_dir=tmp_path / "d", base=str(tiny_model_dir),
                 threshold=1.5, progress=False)
    assert not (tmp_path / "d").exists()


def test_csv_jsonl_collections_and_bad_images(collection, tiny_model_dir, tmp_path):
    rows = [(f"collection/img{i:02d}.png", c) for i, c in enumerate(CAPTIONS)]
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in rows))
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps({"image": p, "text": c}) + "\n" for p, c in rows))
    for source in (csv_file, jsonl):
        items = read_collection(source)
        assert [it.caption for it in items] == CAPTIONS and items[0].path == collection / "img00.png"
    assert len(read_collection(collection)) == len(CAPTIONS)  # the image without a caption is left out

    (collection / "broken.png").write_bytes(b"not an image")
    (collection / "broken.txt").write_text("a photo of a dog")
    result = retrieve("a photo of a dog", csv_file, n=2, out_dir=tmp_path / "r", base=str(tiny_model_dir), progress=False)
    result2 = retrieve("a photo of a dog", collection, n=2, out_dir=tmp_path / "r2", base=str(tiny_model_dir),
                       progress=False)
    assert all("broken" not in r["source"] for r in result.chosen + result2.chosen)
    assert len(result2.chosen) == 2

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,words\na.png,a dog\n")
    with pytest.raises(RetrievalError, match="header"):
        read_collection(bad_csv)
    with pytest.raises(RetrievalError, match="no such file"):
        read_collection(tmp_path / "nothing")
    with pytest.raises(RetrievalError, match="--base"):
        retrieve("a photo of a dog", collection, n=2, out_dir=tmp_path / "x", progress=False)


def test_no_collection_falls_back_to_generated_images(tmp_path, caplog):
    result = retrieve("a photo of a dog", None, n=5, out_dir=tmp_path / "reg")
    assert result.generated_fallback and result.out_dir is None and not (tmp_path / "reg").exists()
    assert "generated" in caplog.text


def test_clip_model_folder_as_text_model(collection, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from dreamtune.assets import CLIP_TOKENIZER_DIR
    from dreamtune.data.retrieval import TextEmbedder

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR).save_pretrained(folder)
    embedder = TextEmbedder.load(str(folder))
    features = embedder(["a dog", "a cat"])
    assert features.shape == (2, 16)  # the projected feature, as CLIP itself computes it
    clip = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        reference = clip.get_text_features(**embedder.tokenizer(["a dog", "a cat"], padding=True, return_tensors="pt"))
    reference = getattr(reference, "pooler_output", reference)
    torch.testing.assert_close(features, torch.nn.functional.normalize(reference, dim=-1), rtol=1e-4, atol=1e-5)
    result = retrieve("a photo of a dog", collection, n=3, out_dir=tmp_path / "r", text_model=str(folder),
                      progress=False)
    assert result.chosen[0]["caption"] == "a photo of a dog"


def test_retrieve_command_line(collection, tiny_model_dir, tmp_path, capsys):
    from dreamtune.cli import main

    out = tmp_path / "reg"
    argv = ["retrieve", "--class-prompt", "a photo of a dog", "--collection", str(collection), "-n", "3",
            "--out", str(out), "--base", str(tiny_model_dir)]
    assert main(argv) == 0
    assert "class_data_dir" in capsys.readouterr().out and len(list(out.glob("*.txt"))) == 4
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert main(["retrieve", "--class-prompt", "a dog", "--out", str(tmp_path / "none")]) == 0
    assert "generate" in capsys.readouterr().out
