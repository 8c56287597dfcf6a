"""The closed-form Custom Diffusion merge: the solver, its errors, and merged artifacts that load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreamtune.merge import MergeError, dedupe_rows, solve_constrained

CAPTIONS = [f"a photo of a {colour} {thing} {where}" for colour in ("red", "blue", "green", "small", "large")
            for thing in ("dog", "cat", "house", "tree") for where in ("on the grass", "in a room", "at night")]


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kkt_reference(w0, c_reg, c, v):
    """The same problem as one KKT system per output row, solved by numpy's least squares."""
    w0, c_reg, c, v = (t.numpy() for t in (w0, c_reg, c, v))
    d, m = w0.shape[1], c.shape[0]
    gram = c_reg.T @ c_reg
    kkt = np.block([[2 * gram, c.T], [c, np.zeros((m, m))]])
    rhs = np.concatenate([2 * gram @ w0.T, v], axis=0)
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return torch.from_numpy(solution[:d].T)


def _objective(w, w0, c_reg):
    return float(torch.linalg.matrix_norm(c_reg @ (w - w0).T) ** 2)


def test_solver_matches_a_generic_kkt_solve_and_holds_the_constraints():
    for seed in range(3):
        w0, c_reg = _random(5, 7, seed=seed), _random(30, 7, seed=seed + 10)
        c, v = _random(3, 7, seed=seed + 20), _random(3, 5, seed=seed + 30)
        w = solve_constrained(w0, c_reg, c, v)
        reference = _kkt_reference(w0, c_reg, c, v)
        assert torch.linalg.matrix_norm(c @ w.T - v) / torch.linalg.matrix_norm(v) < 1e-10
        assert _objective(w, w0, c_reg) == pytest.approx(_objective(reference, w0, c_reg), rel=1e-6)
        torch.testing.assert_close(w, reference, rtol=1e-6, atol=1e-7)
        # Any other feasible W (here: a step along the constraints' null space) costs more.
        null = torch.linalg.svd(c, full_matrices=True).Vh[3:]
        other = w + 0.1 * _random(5, 4, seed=seed) @ null
        assert torch.linalg.matrix_norm(c @ other.T - v) < 1e-9
        assert _objective(other, w0, c_reg) > _objective(w, w0, c_reg)


def test_solver_keeps_consistent_dependent_rows_and_rejects_conflicting_ones():
    w0, c_reg = _random(4, 6, seed=1), _random(25, 6, seed=2)
    c, v = _random(2, 6, seed=3), _random(2, 4, seed=4)
    # A third row that is the sum of the first two, with the matching target: still solvable.
    c3, v3 = torch.cat([c, c.sum(0, keepdim=True)]), torch.cat([v, v.sum(0, keepdim=True)])
    w = solve_constrained(w0, c_reg, c3, v3)
    torch.testing.assert_close(w, solve_constrained(w0, c_reg, c, v))
    with pytest.raises(MergeError, match="cannot all hold"):
        solve_constrained(w0, c_reg, c3, torch.cat([v, v.sum(0, keepdim=True) + 1.0]))
    # Captions that cover only some directions: the constraints still hold, and the uncovered
    # directions keep the base weight (the smallest change there).
    few = _random(3, 6, seed=5)
    w = solve_constrained(w0, few, c, v)
    assert torch.linalg.matrix_norm(c @ w.T - v) / torch.linalg.matrix_norm(v) < 1e-8
    assert torch.linalg.matrix_norm(w - w0) < 1e3 * torch.linalg.matrix_norm(v)


def test_duplicate_rows_are_dropped_and_conflicting_duplicates_refused():
    c, v = _random(3, 6, seed=6), _random(3, 4, seed=7)
    kept_c, kept_v = dedupe_rows(torch.cat([c, c[:1]]), torch.cat([v, v[:1]]))
    assert torch.equal(kept_c, c) and torch.equal(kept_v, v)
    with pytest.raises(MergeError, match="same text features"):
        dedupe_rows(torch.cat([c, c[:1]]), torch.cat([v, v[:1] + 1]))


# --- merged artifacts ---------------------------------------------------------------------
def _fake_run(tiny_model_dir, folder, token, class_noun, seed, instance_prompt=None):
    """A Custom Diffusion artifact with perturbed K/V weights and one token, written by the library's writers."""
    from dreamtune.artifacts import metadata, write_metadata
    from dreamtune.io import save_safetensors
    from dreamtune.methods.custom_diffusion import (
        WEIGHT_NAME,
        cross_attention_layers,
        diffusers_state_dict,
        save_token_files,
    )
    from dreamtune.pipeline import load_base

    pipe = load_base(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in cross_attention_layers(pipe.unet):
        for proj in ("to_k", "to_v"):
            w0 = pipe.unet.get_parameter(f"{layer}.{proj}.weight").detach()
            weights[f"{layer}.{proj}.weight"] = w0 + 0.2 * torch.randn(w0.shape, generator=gen)
    embedding = torch.randn(32, generator=gen)
    folder.mkdir(parents=True)
    save_safetensors(diffusers_state_dict(pipe.unet, weights), folder / WEIGHT_NAME)
    save_token_files({token: {"clip": embedding}}, folder)
    write_metadata(folder, metadata("custom_diffusion", str(tiny_model_dir), [token],
                                    concepts=[{"identifier": token, "class_noun": class_noun,
                                               **({"instance_prompt": instance_prompt} if instance_prompt else {})}]))
    return folder, weights


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge_runs")
    return [_fake_run(tiny_model_dir, tmp / "a", "<new1>", "dog", 1), _fake_run(tiny_model_dir, tmp / "b", "<new2>", "cat", 2)]


def _constraint_errors(merged_dir, runs):
    """Relative error of C_i W^T against C_i W_i^T for each run's concept, with the merged weights."""
    from safetensors.torch import load_file

    from dreamtune.merge import concept_features
    from dreamtune.methods.custom_diffusion import WEIGHT_NAME, weights_from_diffusers
    from dreamtune.pipeline import load_pipeline

    pipe = load_pipeline(None, merged_dir)
    merged = weights_from_diffusers(load_file(merged_dir / WEIGHT_NAME))
    errors = []
    for (_folder, weights), (token, noun) in zip(runs, (("<new1>", "dog"), ("<new2>", "cat"))):
        c = concept_features(pipe, token, noun)
        for name, w in weights.items():
            target = c @ w.double().T
            errors.append(float(torch.linalg.matrix_norm(c @ merged[name].double().T - target)
                                / torch.linalg.matrix_norm(target)))
    return pipe, merged, errors


def test_merge_two_concepts_holds_both_and_loads(two_runs, tiny_model_dir, tmp_path):
    from dreamtune.merge import merge
    from dreamtune.pipeline import load_base, sample

    result = merge([f for f, _ in two_runs], CAPTIONS, tmp_path / "merged")
    assert result.tokens == ["<new1>", "<new2>"] and result.max_constraint_error < 1e-6
    pipe, merged, errors = _constraint_errors(tmp_path / "merged", two_runs)
    assert max(errors) < 1e-5
    # The merge moved the weights (neither base nor one run's), and both tokens render.
    base = load_base(str(tiny_model_dir))
    name = next(iter(merged))
    assert not torch.allclose(merged[name], base.unet.get_parameter(name))
    assert not torch.allclose(merged[name], two_runs[0][1][name])
    images = sample(pipe, ["a photo of <new1> dog", "a photo of <new2> cat"], num_images=1, steps=2, height=32, width=32)
    assert all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for im in images)
    assert (tmp_path / "merged" / "reg_captions.txt").read_text().splitlines() == CAPTIONS


def test_merge_holds_each_concept_on_the_prompt_it_was_trained_on(two_runs, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from dreamtune.merge import merge, token_features
    from dreamtune.methods.custom_diffusion import WEIGHT_NAME, weights_from_diffusers
    from dreamtune.pipeline import load_pipeline

    # The same weights, with the prompt each concept was trained on recorded (dreamtune.json's concepts).
    prompts = {"<new1>": "a photo of a <new1> dog", "<new2>": "a photo of a <new2> cat"}
    recorded = [_fake_run(tiny_model_dir, tmp_path / token.strip("<>"), token, noun, seed, prompts[token])
                for token, noun, seed in (("<new1>", "dog", 1), ("<new2>", "cat", 2))]
    for (_, weights), (_, same) in zip(recorded, two_runs):
        assert all(torch.equal(weights[n], same[n]) for n in weights)

    def errors_on_trained_prompts(merged_dir):
        pipe = load_pipeline(None, merged_dir)
        merged = weights_from_diffusers(load_file(merged_dir / WEIGHT_NAME))
        errors = []
        for (_, weights), (token, prompt) in zip(recorded, prompts.items()):
            ids = pipe.tokenizer(prompt).input_ids
            c = token_features(pipe, prompt, ids.index(pipe.tokenizer.convert_tokens_to_ids(token)))
            for name, w in weights.items():
                target = c @ w.double().T
                errors.append(float(torch.linalg.matrix_norm(c @ merged[name].double().T - target)
                                    / torch.linalg.matrix_norm(target)))
        return errors

    merge([f for f, _ in recorded], CAPTIONS, tmp_path / "merged")
    assert max(errors_on_trained_prompts(tmp_path / "merged")) < 1e-5
    assert json.loads((tmp_path / "merged" / "dreamtune.json").read_text())["concepts"][1]["instance_prompt"] == prompts["<new2>"]
    # Without the record, the rows of "a photo of a <new1> dog" differ from the default prompts' (the text
    # encoder is causal: the article before the token changes its features) and are not held.
    merge([f for f, _ in two_runs], CAPTIONS, tmp_path / "unrecorded")
    assert min(errors_on_trained_prompts(tmp_path / "unrecorded")) > 1e-3


def test_merge_of_one_concept_keeps_its_outputs(two_runs, tmp_path):
    from dreamtune.merge import merge

    merge([two_runs[0][0]], CAPTIONS, tmp_path / "one")
    _, _, errors = _constraint_errors(tmp_path / "one", two_runs[:1])
    assert max(errors) < 1e-5


def test_merge_reads_compressed_artifacts_and_is_callable_from_the_package(two_runs, tiny_model_dir, tmp_path):
    import shutil

    import dreamtune
    from dreamtune.io import save_safetensors
    from dreamtune.methods.custom_diffusion import LORA_WEIGHT_NAME, WEIGHT_NAME, compress
    from dreamtune.pipeline import load_base

    # The second run stored as a rank-4 LoRA of its weight changes (what compress_rank = 4 writes).
    folder, weights = two_runs[1]
    compressed = tmp_path / "b_lowrank"
    shutil.copytree(folder, compressed)
    (compressed / WEIGHT_NAME).unlink()
    unet = load_base(str(tiny_model_dir)).unet
    base = {n: unet.get_parameter(n).detach() for n in weights}
    state, report = compress(weights, base, 4)
    assert report["relative_error"] > 0.1
    save_safetensors(state, compressed / LORA_WEIGHT_NAME)
    reconstructed = {n: base[n] + state[f"unet.{n[:-7]}.lora_B.weight"] @ state[f"unet.{n[:-7]}.lora_A.weight"]
                     for n in weights}

    dreamtune.merge  # noqa: B018 -- the first access imports the submodule
    dreamtune.merge([two_runs[0][0], compressed], CAPTIONS, tmp_path / "merged")
    _, _, errors = _constraint_errors(tmp_path / "merged", [two_runs[0], (compressed, reconstructed)])
    assert max(errors) < 1e-5


def test_merge_errors(two_runs, tmp_path):
    import json

    from dreamtune.merge import merge

    with pytest.raises(MergeError, match="both use the modifier token <new1>"):
        merge([two_runs[0][0], two_runs[0][0]], CAPTIONS, tmp_path / "x")
    with pytest.raises(MergeError, match="no such file"):
        merge([two_runs[0][0]], tmp_path / "missing.txt", tmp_path / "x")
    other = tmp_path / "lora"
    other.mkdir()
    (other / "dreamtune.json").write_text(json.dumps({"method": "lora", "base_model": "x"}))
    with pytest.raises(MergeError, match="only Custom Diffusion"):
        merge([other], CAPTIONS, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_command_line(two_runs, tmp_path, capsys):
    from dreamtune.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "merged"
    argv = ["merge", str(two_runs[0][0]), str(two_runs[1][0]), "--reg-captions", str(captions), "--out", str(out)]
    assert main(argv) == 0
    assert "<new1>, <new2>" in capsys.readouterr().out
    assert main(argv) == 2  # the output exists: refused without --overwrite
    assert "not empty" in capsys.readouterr().err
