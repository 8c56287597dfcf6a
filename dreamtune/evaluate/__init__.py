"""Evaluation: the papers' metrics, per-run reports, `dreamtune eval` and the DreamBench runner.

The names below are imported on first use, so `import dreamtune.evaluate` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "dino_score": "metrics", "clip_i_score": "metrics", "clip_t_score": "metrics", "clipscore": "metrics",
    "kid_score": "metrics", "kid_from_features": "metrics", "pres_score": "metrics", "div_score": "metrics",
    "real_image_scores": "metrics", "scoring_prompt": "metrics", "load_embedder": "metrics",
    "evaluate_run": "runner", "score_folders": "runner", "ScoringModels": "runner",
    "run_bench": "bench", "load_spec": "bench", "register_scorer": "bench",
    "write_reports": "report", "builtin_prompts": "prompts",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
