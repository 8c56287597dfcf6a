"""Personalizing the shipped shapes-world model: the papers' claims, checked by the oracle (slow)."""

from __future__ import annotations

import pytest

from dreamtune.world import MODEL_DIR

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("subject_name", ["striped_star", "split_heart"])
def test_dreambooth_learns_the_subject_and_prior_preservation_limits_drift(tmp_path, subject_name):
    from dreamtune.pipeline import load_pipeline
    from dreamtune.training import train
    from dreamtune.world.demo import score_model, train_config
    from dreamtune.world.subjects import get_subject, write_subject_images

    subject = get_subject(subject_name)
    instance_dir = tmp_path / "subject"
    write_subject_images(subject, instance_dir)
    base_scores, _ = score_model("base", load_pipeline(str(MODEL_DIR)), subject, "sks", seed=0)
    scores = {}
    for prior in (True, False):
        config = train_config(subject, "dreambooth", instance_dir, tmp_path / "class_images",
                              tmp_path / f"run_prior_{prior}", steps=None, seed=0, with_prior_preservation=prior)
        result = train(config, progress=False)
        scores[prior], _ = score_model(f"prior={prior}", load_pipeline(None, result.artifact_dir), subject, "sks",
                                       seed=0)
    assert scores[True].subject_fidelity > base_scores.subject_fidelity + 0.2
    assert scores[True].prompt_fidelity > base_scores.prompt_fidelity - 0.1  # the prompts still work
    assert scores[False].subject_fidelity > base_scores.subject_fidelity + 0.2
    assert scores[True].language_drift < scores[False].language_drift
