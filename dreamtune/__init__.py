"""dreamtune: teach a Stable Diffusion model your subject.

DreamBooth, Custom Diffusion, Textual Inversion and LoRA behind one training loop, with the papers'
evaluation. The public API:

    from dreamtune import TrainConfig, ConceptConfig, load_config, train, load_pipeline, sample
    config = load_config("examples/dreambooth.toml", overrides=["max_train_steps=200"])
    result = train(config)
    pipe = load_pipeline(None, result.output_dir)
    images = sample(pipe, "a photo of sks dog on the beach", num_images=4)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Heavy libraries (torch, diffusers) are imported on first use of a name, not on `import dreamtune`.
_EXPORTS = {
    "TrainConfig": "dreamtune.config",
    "ConceptConfig": "dreamtune.config",
    "load_config": "dreamtune.config",
    "train": "dreamtune.training",
    "RunResult": "dreamtune.training",
    "load_base": "dreamtune.pipeline",
    "load_pipeline": "dreamtune.pipeline",
    "sample": "dreamtune.pipeline",
    "merge": "dreamtune.merge",
    "evaluate": "dreamtune.evaluate",
    "evaluate_run": "dreamtune.evaluate",
    "DreamtuneError": "dreamtune.errors",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module if name == "evaluate" else getattr(module, name)
    raise AttributeError(f"module 'dreamtune' has no attribute {name!r}")
