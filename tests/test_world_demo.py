"""Personalizing the shipped shapes-world model: the papers' claims, checked by the oracle (slow).

The subjects are generated ones (`gen-S-K`), which no method setting was tuned on.
"""

from __future__ import annotations

import pytest

from dreamtune.world import MODEL_DIR

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("subject_name", ["gen-0-1", "gen-0-2"])
def test_methods_learn_a_generated_subject_and_prior_preservation_limits_drift(tmp_path, subject_name):
    from dreamtune.pipeline import load_pipeline
    from dreamtune.training import train
    from dreamtune.world.demo import score_model, train_config
    from dreamtune.world.subjects import get_subject, write_subject_images

    subject = get_subject(subject_name)
    instance_dir = tmp_path / "subject"
    write_subject_images(subject, instance_dir)
    base, _ = score_model("base", load_pipeline(str(MODEL_DIR)), subject, "sks", seed=0)
    runs = {"dreambooth": ("dreambooth", True), "no_prior": ("dreambooth", False),
            "custom_diffusion": ("custom_diffusion", True)}
    scores = {}
    for label, (method, prior) in runs.items():
        config = train_config(subject, method, instance_dir, tmp_path / "class_images", tmp_path / label,
                              steps=None, seed=0, with_prior_preservation=prior)
        result = train(config, progress=False)
        identifier = config.concepts[0].identifier if config.concepts else config.identifier
        scores[label], _ = score_model(label, load_pipeline(None, result.artifact_dir), subject, identifier, seed=0)
    # DreamBooth learns the subject: far above the base model, and the prompts still work.
    assert scores["dreambooth"].subject_fidelity > base.subject_fidelity + 0.2
    assert scores["dreambooth"].prompt_fidelity > base.prompt_fidelity - 0.15
    # Custom Diffusion learns it too, with its small share of trained weights.
    assert scores["custom_diffusion"].subject_fidelity > base.subject_fidelity + 0.1
    # Prior preservation cuts language drift by at least half against the same run without it.
    assert scores["no_prior"].language_drift > 0.2
    assert scores["dreambooth"].language_drift <= 0.5 * scores["no_prior"].language_drift
