"""Evaluation: the papers' metrics, per-run reports, `dreamtune eval` and the DreamBench runner."""
