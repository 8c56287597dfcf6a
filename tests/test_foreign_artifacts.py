"""Weights trained elsewhere load where dreamtune's do, recognised by content (no dreamtune.json).

Each artifact is written here in the layout its tool writes: diffusers' example scripts
(train_dreambooth.py, train_custom_diffusion.py, textual_inversion.py, train_dreambooth_lora.py)
and kohya's sd-scripts LoRA files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dreamtune.artifacts import read_artifact
from dreamtune.cli import main
from dreamtune.pipeline import load_base, load_pipeline, sample


def _card(folder, base, prompt):
    # The front matter of the model card diffusers' scripts write beside their weights.
    (folder / "README.md").write_text(f"---\nlicense: creativeml-openrail-m\nbase_model: {base}\n"
                                      f"instance_prompt: {prompt}\ntags:\n- diffusers\n---\n# weights\n")


def _custom_diffusion_script_output(tiny_model_dir, folder, token, seed):
    """What train_custom_diffusion.py leaves: save_attn_procs' weights (cross-attention only) and <token>.bin."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    pipe = load_base(str(tiny_model_dir))
    unet = pipe.unet
    gen = torch.Generator().manual_seed(seed)
    procs, trained = {}, {}
    for name in unet.attn_processors:
        layer = unet.get_submodule(name[: -len(".processor")])
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False,
                                                       hidden_size=layer.to_q.out_features, cross_attention_dim=None)
            continue
        proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=layer.to_q.out_features,
                                            cross_attention_dim=unet.config.cross_attention_dim)
        with torch.no_grad():
            for proj in ("to_k", "to_v"):
                weight = getattr(layer, proj).weight + 0.05 * torch.randn(getattr(layer, proj).weight.shape, generator=gen)
                getattr(proc, f"{proj}_custom_diffusion").weight.copy_(weight)
                trained[f"{name}.{proj}_custom_diffusion.weight"] = weight.clone()
        procs[name] = proc
    unet.set_attn_processor(procs)
    folder.mkdir(parents=True)
    unet.save_attn_procs(str(folder), safe_serialization=True)
    row = torch.randn(pipe.text_encoder.get_input_embeddings().weight.shape[1], generator=gen)
    save_file({token: row}, str(folder / f"{token}.bin"), metadata={"format": "pt"})
    _card(folder, tiny_model_dir, f"photo of a {token} dog")
    return trained, row


def test_dreambooth_pipeline_folder_samples(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "dreambooth-out"
    load_base(str(tiny_model_dir)).save_pretrained(str(folder))
    info = read_artifact(folder)
    assert info.method == "dreambooth" and info.is_full_pipeline
    code = main(["sample", "--weights", str(folder), "--prompt", "a dog", "-n", "1", "--steps", "2",
                 "--out", str(tmp_path / "samples")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "samples" / "prompt00-00.png").is_file()


def test_custom_diffusion_script_output_loads_and_merges(tiny_model_dir, tmp_path):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    from dreamtune.merge import merge
    from dreamtune.methods.custom_diffusion import WEIGHT_NAME

    a, b = tmp_path / "dog", tmp_path / "cat"
    trained, row = _custom_diffusion_script_output(tiny_model_dir, a, "<new1>", seed=1)
    _custom_diffusion_script_output(tiny_model_dir, b, "<new2>", seed=2)
    # diffusers' own loader refuses its own script's file: no entries for the self-attention layers.
    plain = load_base(str(tiny_model_dir))
    with pytest.raises(ValueError, match="does not match the number of attention layers"):
        plain.unet.load_attn_procs(str(a), weight_name=WEIGHT_NAME, _pipeline=plain)

    info = read_artifact(a)
    assert (info.method, info.tokens, info.base_model) == ("custom_diffusion", ["<new1>"], str(tiny_model_dir))
    assert info.extra["concepts"] == [{"identifier": "<new1>", "class_noun": "dog",
                                       "instance_prompt": "photo of a <new1> dog"}]
    pipe = load_pipeline(None, a)
    procs = pipe.unet.attn_processors
    for key, weight in trained.items():
        name, param = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        assert isinstance(procs[name], CustomDiffusionAttnProcessor2_0)
        assert torch.equal(getattr(procs[name], param).weight, weight)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], row)

    result = merge([a, b], ["a photo of a dog", "a cat on a sofa", "a red car"], tmp_path / "merged")
    merged = load_pipeline(None, result.out_dir)
    assert {"<new1>", "<new2>"} <= set(merged.tokenizer.get_vocab())


def test_textual_inversion_learned_embeds_loads_and_evaluates(tiny_model_dir, subject_dir, tmp_path, capsys):
    import json

    from dreamtune.evaluate.tiny_models import save_tiny_clip, save_tiny_dino

    folder = tmp_path / "ti-out"
    folder.mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    # textual_inversion.py: {placeholder: (num_vectors, width)} in learned_embeds.safetensors.
    save_file({"<cat-toy>": vectors}, str(folder / "learned_embeds.safetensors"), metadata={"format": "pt"})
    info = read_artifact(folder)
    assert (info.method, info.tokens, info.base_model) == ("textual_inversion", ["<cat-toy>"], "")
    with pytest.raises(Exception, match="pass it with --base"):
        load_pipeline(None, folder)
    pipe = load_pipeline(str(tiny_model_dir), folder / "learned_embeds.safetensors")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)

    # Evaluated without a run folder: the subject comes from the flags.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {identifier} {class_noun} on a table\n")
    models = ["--dino-model", str(save_tiny_dino(tmp_path / "dino")), "--clip-model", str(save_tiny_clip(tmp_path / "clip")),
              "--device", "cpu"]
    code = main(["eval", str(folder), "--base", str(tiny_model_dir), "--class-noun", "dog", "--real-images", str(subject_dir),
                 "--resolution", "32", "--prompts", str(prompts), "--images-per-prompt", "1", "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "eval"), *models])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["method"] == "textual_inversion" and saved["prompts"][0]["prompt"] == "a <cat-toy> dog on a table"


def test_diffusers_and_kohya_lora_files_sample_alike(tiny_model_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_base(str(tiny_model_dir))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_state = get_peft_model_state_dict(pipe.unet)
    expected = np.asarray(sample(pipe, "a dog", num_images=1, steps=2)[0], dtype=np.int16)

    # train_dreambooth_lora.py saves with the pipeline's save_lora_weights.
    diffusers_dir = tmp_path / "lora-out"
    StableDiffusionPipeline.save_lora_weights(str(diffusers_dir), unet_lora_layers=convert_state_dict_to_diffusers(peft_state))
    # kohya's sd-scripts: lora_unet_* names with .alpha entries, one file.
    kohya_state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    kohya_state.update({k.replace(".lora_down.weight", ".alpha"): torch.tensor(4.0)
                        for k in list(kohya_state) if k.endswith(".lora_down.weight")})
    kohya_file = tmp_path / "my_subject.safetensors"
    save_file(kohya_state, str(kohya_file), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                                     "ss_network_alpha": "4.0"})
    for weights, layout in ((diffusers_dir, "diffusers"), (kohya_file, "kohya")):
        info = read_artifact(weights)
        assert (info.method, info.extra["layout"]) == ("lora", layout)
        out = tmp_path / f"samples-{layout}"
        code = main(["sample", "--base", str(tiny_model_dir), "--weights", str(weights), "--prompt", "a dog", "-n", "1",
                     "--steps", "2", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        from PIL import Image

        image = np.asarray(Image.open(out / "prompt00-00.png"), dtype=np.int16)
        assert np.abs(image - expected).max() <= 1


def test_unknown_folder_says_what_it_is_not(tmp_path):
    from dreamtune.errors import ModelLoadError

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="nor weights in a layout dreamtune knows"):
        read_artifact(tmp_path)
