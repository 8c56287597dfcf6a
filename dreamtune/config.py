"""The config schema: every option once, with its default, type, range and help.

The CLI flags, a TOML file, `--set key=value` overrides and the Python API all fill the same
`TrainConfig`. Option names follow diffusers' training scripts where a user would look for them.
The resolved config (every default written out) is saved as `config.toml` in each run folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, section: str = "training", flag: bool = False) -> Any:
    """Declare one option. `flag=True` also exposes it as a CLI flag of `dreamtune train`."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "section": section, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ConceptConfig:
    """One subject (or style) to learn: its images, its identifier and its class."""

    instance_data_dir: str = opt("", "Folder of 3-5 images of the subject; a same-named .txt beside an image is its caption.", section="concept")
    identifier: str = opt("sks", "Rare token that names the subject (DreamBooth's [V]); for Custom Diffusion and Textual Inversion a new token such as <new1>.", section="concept")
    class_noun: str = opt("", "The subject's class, e.g. 'dog' or 'backpack'.", section="concept")
    instance_prompt: str = opt("a photo of {identifier} {class_noun}", "Template for the subject's images.", section="concept")
    class_prompt: str = opt("a photo of {class_noun}", "Template for the class (prior) images.", section="concept")
    class_data_dir: str = opt("", "Folder of class images: generated there when missing, or real images with .txt captions. Empty: ~/.cache/dreamtune/class_images/<prompt>-<key> ($DREAMTUNE_CACHE moves it).", section="concept")
    initializer_token: str = opt("", "Single-token word whose embedding initialises a new token (Custom Diffusion, Textual Inversion). Empty: the class noun.", section="concept")

    def format(self, template: str) -> str:
        """Fill {identifier} and {class_noun} (also accepted: {class}) in a template."""
        return template.replace("{class}", "{class_noun}").format(identifier=self.identifier, class_noun=self.class_noun)

    @property
    def prompt(self) -> str:
        return self.format(self.instance_prompt)

    @property
    def class_prompt_text(self) -> str:
        return self.format(self.class_prompt)


@dataclass
class TrainConfig:
    """Everything a training run needs. Build it with `load_config` or directly in Python."""

    # model
    pretrained_model_name_or_path: str = opt("", "Base model: a diffusers folder, a hub id, or a single .safetensors/.ckpt file.", section="model", flag=True)
    revision: str = opt("", "Hub revision of the base model.", section="model")
    variant: str = opt("", "Weight variant of the base model, e.g. 'fp16'.", section="model")
    single_file_config: str = opt("", "For a single-file base model: a diffusers folder or hub id giving its component configs (needed offline).", section="model")
    vae_path: str = opt("", "A VAE to use instead of the base model's: a folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix, which does not overflow in fp16).", section="model")
    method: str = opt("dreambooth", "Personalization method: dreambooth, custom_diffusion, textual_inversion, lora (or one registered in dreamtune.methods).", section="model", flag=True)
    # run
    output_dir: str = opt("runs/dreamtune", "Run folder: config, checkpoints, samples, logs and the artifact.", section="run", flag=True)
    seed: int = opt(0, "Seed for every random choice; with it a CPU run is reproducible.", section="run", flag=True)
    # data
    resolution: int = opt(512, "Training resolution in pixels (images are resized and cropped to it).", min=8, section="data", flag=True)
    center_crop: bool = opt(True, "Crop the centre (else a random crop) after resizing.", section="data")
    random_flip: bool = opt(False, "Flip images horizontally at random.", section="data")
    augment: str | None = opt(None, "Custom Diffusion's rescale augmentation with 'very small'/'zoomed in' prompt words and a masked loss: 'on' or 'off' ('auto': the method's default).", choices=("auto", "on", "off"), section="data")
    skip_bad_images: bool = opt(False, "Skip unreadable images with a warning instead of stopping.", section="data", flag=True)
    repeats: int = opt(1, "How many times each instance image counts per epoch (kohya's num_repeats).", min=1, section="data")
    bucketing: bool = opt(False, "Aspect-ratio bucketing: train each image at the bucket (about resolution² pixels, sides in multiples of bucket_step) nearest its aspect ratio instead of a square crop; each batch is one bucket.", section="data", flag=True)
    bucket_step: int = opt(64, "Bucket sides are multiples of this many pixels.", min=8, section="data")
    bucket_max_ratio: float = opt(2.0, "Longest bucket side over the shortest, at most.", min=1.0, section="data")
    caption_dropout: float = opt(0.0, "Share of instance examples trained with an empty prompt (chosen per example by the seed), so guidance keeps an unconditional model to contrast with.", min=0.0, max=1.0, section="data")
    # prior preservation
    with_prior_preservation: bool = opt(False, "Train on the class images beside the subject's, so the class is not forgotten.", section="prior", flag=True)
    prior_loss_weight: float = opt(1.0, "Weight of the prior-preservation loss (the paper's lambda).", min=0.0, section="prior", flag=True)
    num_class_images: int | None = opt(None, "Class images to use; missing ones are generated by the frozen base model.", min=1, section="prior", flag=True)
    class_prompt_source: str = opt("auto", "Prompts of the class images: 'template' (class_prompt) or 'captions' (the .txt beside each real image); 'auto' uses captions when present.", choices=("auto", "template", "captions"), section="prior")
    sample_batch_size: int = opt(4, "Batch size when generating class images.", min=1, section="prior")
    class_generation_steps: int = opt(30, "Sampling steps when generating class images.", min=1, section="prior")
    class_generation_guidance: float = opt(7.5, "Guidance scale when generating class images.", min=0.0, section="prior")
    # optimisation
    train_batch_size: int | None = opt(None, "Instance images per step per process (the class half doubles it).", min=1, section="optim", flag=True)
    max_train_steps: int | None = opt(None, "Optimizer steps.", min=1, section="optim", flag=True)
    gradient_accumulation_steps: int = opt(1, "Batches accumulated per optimizer step.", min=1, section="optim", flag=True)
    learning_rate: float | None = opt(None, "Learning rate (before scale_lr).", min=0.0, section="optim", flag=True)
    scale_lr: bool | None = opt(None, "Multiply the learning rate by batch size x accumulation x processes (Custom Diffusion does).", section="optim")
    lr_scheduler: str = opt("constant", "Learning-rate schedule.", choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"), section="optim")
    lr_warmup_steps: int = opt(0, "Warm-up steps of the schedule.", min=0, section="optim")
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0, section="optim")
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0.0, max=1.0, section="optim")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.", min=0.0, section="optim")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", min=0.0, section="optim")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", min=0.0, section="optim")
    use_8bit_adam: bool = opt(False, "8-bit AdamW from bitsandbytes (CUDA).", section="optim")
    train_text_encoder: bool = opt(False, "Also fine-tune the text encoder (DreamBooth, LoRA).", section="optim", flag=True)
    text_encoder_lr: float = opt(0.0, "Learning rate of the text encoder (0: same as learning_rate).", min=0.0, section="optim")
    snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (0: plain MSE).", min=0.0, section="optim")
    # memory and speed
    mixed_precision: str = opt("no", "Mixed precision of the frozen parts and autocast.", choices=("no", "fp16", "bf16"), section="speed", flag=True)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.", section="speed", flag=True)
    attention: str = opt("sdpa", "Attention kernel: PyTorch scaled-dot-product ('sdpa'), 'xformers' or diffusers' plain one ('eager').", choices=("sdpa", "xformers", "eager"), section="speed")
    cache_latents: bool = opt(True, "Encode images with the VAE once when no random augmentation is on.", section="speed")
    cache_text_embeddings: bool = opt(True, "Encode prompts once when the text encoder is frozen.", section="speed")
    cache_to_disk: bool = opt(False, "Keep those cached latents and prompt embeddings on disk (in cache_dir) instead of in memory, for datasets whose encodings do not fit; entries are named by their content and the model, so later runs reuse them.", section="speed")
    cache_dir: str = opt("", "Folder of the on-disk caches (cache_to_disk). Empty: ~/.cache/dreamtune/encoded ($DREAMTUNE_CACHE moves it).", section="speed")
    vae_fp32: bool = opt(False, "Keep the VAE in float32 under mixed precision (SDXL's own VAE overflows in fp16).", section="speed")
    # checkpoints and logging
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every N steps (0: never).", min=0, section="run", flag=True)
    checkpoints_total_limit: int = opt(0, "Keep at most this many checkpoints (0: all).", min=0, section="run")
    validation_prompts: list = opt([], "Prompts rendered into a PNG grid during training; {identifier} and {class_noun} are filled from the first concept.", section="validation")
    validation_steps: int = opt(100, "Render the validation prompts every N steps and at the end (0: never).", min=0, section="validation", flag=True)
    num_validation_images: int = opt(2, "Images per validation prompt.", min=1, section="validation")
    validation_inference_steps: int = opt(25, "Sampling steps for validation.", min=1, section="validation")
    validation_guidance_scale: float = opt(7.5, "Guidance scale for validation.", min=0.0, section="validation")
    logging_steps: int = opt(1, "Log loss and lr every N steps.", min=1, section="run")
    report_to: str = opt("csv", "Where to log: 'csv' always; 'tensorboard' or 'wandb' as well.", choices=("csv", "tensorboard", "wandb"), section="run")
    # concepts
    concepts: list = field(default_factory=list, metadata={"help": "The concepts ([[concepts]] tables).", "section": "concepts"})
    # the method's own options
    method_options: Any = field(default=None, metadata={
        "help": "The method's own options (its Options dataclass, or a mapping of them): the [<method>] table.",
        "section": "method"})

    def __post_init__(self) -> None:
        self.concepts = [c if isinstance(c, ConceptConfig) else concept_from_dict(c) for c in self.concepts]
        resolve_method(self)

    @property
    def augment_enabled(self) -> bool:
        return self.augment == "on"


#: TrainConfig fields that are not plain options (not flat TOML keys or flags).
STRUCTURED = ("concepts", "method_options")


def method_default_options() -> list[str]:
    """The options whose default depends on the method (None in the schema until resolved)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.default is None and f.name not in STRUCTURED]


def resolve_method(config: TrainConfig) -> None:
    """Fill what the method decides, in place: unset options (None, or augment = 'auto') and its Options.

    Every way of building a config (`load_config`, `TrainConfig(...)` in Python, the CLI, a bench
    cell) passes through here once, from `TrainConfig.__post_init__`, so they resolve alike.
    """
    from .methods import get_method

    method = get_method(config.method)
    for name in method_default_options():
        if getattr(config, name) in (None, "auto"):
            setattr(config, name, method.defaults[name])
    config.method_options = method_options_from(method, config.method_options, f"[{config.method}]")


def method_options_from(method, value: Any, where: str) -> Any:
    """A method's Options from None (its defaults), a mapping (checked like a TOML table) or an instance."""
    if method.Options is None:
        if value:
            raise ConfigError(f"{where}: method '{method.name}' has no options of its own.")
        return None
    if value is None:
        return method.Options()
    if isinstance(value, method.Options):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of {method.name} options, got {value!r}.")
    known = _fields(method.Options)
    for k in value:
        if k not in known:
            raise ConfigError(f"{where}: unknown {method.name} option '{k}'.{_suggest(k, known)}")
    return method.Options(**{k: coerce(method.Options, k, v, where) for k, v in value.items()})


def is_option(key: str) -> bool:
    """True when `key` may appear at the top of a config: an option, a method's table or its flat key."""
    from .methods import method_names

    return (key in _fields(TrainConfig) and key != "method_options") or key in method_names() \
        or _method_option(key, TrainConfig.method) is not None


def _method_option(key: str, method: str) -> tuple[str, str] | None:
    """The (method, option) a flat key such as `lora_rank` or `num_vectors` names; the run's method first."""
    from .methods import get_method, method_names

    for name in [method] + [m for m in method_names() if m != method]:
        options = get_method(name).Options
        fields = _fields(options) if options is not None else {}
        for option in (key, key.removeprefix(f"{name}_")):
            if option in fields:
                return name, option
    return None


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_of(cls, name: str) -> type:
    hints = typing.get_type_hints(cls)
    t = hints[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def coerce(cls, name: str, value: Any, where: str) -> Any:
    """Check one option's type and range, converting strings from the command line."""
    f = _fields(cls)[name]
    t = _type_of(cls, name)
    meta = f.metadata
    try:
        if t is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("true", "1", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif t is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif t is list:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, list):
                raise ValueError
            value = [str(v) for v in value]
        elif t is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{where}: option '{name}' expects {t.__name__}, got {value!r}.") from None
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: option '{name}' must be one of {', '.join(meta['choices'])}; got {value!r}.")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{where}: option '{name}' must be >= {meta['min']}; got {value!r}.")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{where}: option '{name}' must be <= {meta['max']}; got {value!r}.")
    return value


def _suggest(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else " See `dreamtune train --help` for the options."


def concept_from_dict(d: dict, where: str = "concepts") -> ConceptConfig:
    """Build a ConceptConfig from a mapping, rejecting unknown keys."""
    known = _fields(ConceptConfig)
    values = {}
    for k, v in d.items():
        if k not in known:
            raise ConfigError(f"{where}: unknown concept option '{k}'.{_suggest(k, known)}")
        values[k] = coerce(ConceptConfig, k, v, where)
    return ConceptConfig(**values)


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    """Build a TrainConfig from a mapping (a parsed TOML file), checking every key, type and range."""
    from .methods import method_names

    known = {k: f for k, f in _fields(TrainConfig).items() if k != "method_options"}
    method = str(d.get("method", TrainConfig.method))
    values: dict[str, Any] = {}
    tables: dict[str, dict] = {}
    for k, v in d.items():
        if k in method_names() and isinstance(v, dict):
            tables.setdefault(k, {}).update(v)
            continue
        if k not in known:
            owner = _method_option(k, method)
            if owner is None:
                raise ConfigError(f"{where}: unknown option '{k}'.{_suggest(k, known)}")
            # The flat spelling of earlier versions; the method's table wins when both are given.
            tables.setdefault(owner[0], {}).setdefault(owner[1], v)
            continue
        if k == "concepts":
            if isinstance(v, dict):
                v = [v]
            if not isinstance(v, list):
                raise ConfigError(f"{where}: 'concepts' must be a list of [[concepts]] tables.")
            values[k] = [concept_from_dict(c, f"{where}: concepts[{i}]") for i, c in enumerate(v)]
        else:
            values[k] = coerce(TrainConfig, k, v, where)
    # A file may carry the tables of several methods (switch with --method); each is checked, the run's is kept.
    from .methods import get_method

    for name, table in tables.items():
        options = method_options_from(get_method(name), table, f"{where}: [{name}]")
        if name == method:
            values["method_options"] = options
    return TrainConfig(**values)


def apply_override(config_dict: dict, assignment: str) -> None:
    """Apply one `key=value` (`concepts.0.key=value`, `<method>.key=value`) override to a config mapping in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set learning_rate=1e-5.")
    key, value = assignment.split("=", 1)
    key = key.strip()
    if "." in key and not key.startswith("concepts."):
        table, option = key.split(".", 1)
        config_dict.setdefault(table, {})[option] = value
    elif key.startswith("concepts."):
        parts = key.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            raise ConfigError(f"--set {assignment!r}: concept options are set as concepts.<index>.<option>=value.")
        concepts = config_dict.setdefault("concepts", [])
        index = int(parts[1])
        if index > len(concepts):
            raise ConfigError(
                f"--set {assignment!r}: there is no concepts.{index}; the config has {len(concepts)} concept(s), so the "
                f"next one to add is concepts.{len(concepts)}."
            )
        if index == len(concepts):
            concepts.append({})
        concepts[index][parts[2]] = value
    else:
        config_dict[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> TrainConfig:
    """Load a TOML config, apply `key=value` overrides and keyword values, and validate the result."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found. See examples/dreambooth.toml for one to copy.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e}).") from None
    for assignment in overrides or []:
        apply_override(data, assignment)
    data.update({k: v for k, v in values.items() if v is not None})
    return config_from_dict(data, where)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def config_to_toml(config: TrainConfig) -> str:
    """Write the resolved config as TOML, every option with its help as a comment."""
    lines = ["# dreamtune resolved config: every option, defaults written out.", ""]
    section = None
    for f in dataclasses.fields(TrainConfig):
        if f.name in STRUCTURED:
            continue
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines.append(f"# --- {section} ---")
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
    if config.method_options is not None:
        lines += ["", f"[{config.method}]"]
        for f in dataclasses.fields(config.method_options):
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {_toml_value(getattr(config.method_options, f.name))}")
    for c in config.concepts:
        lines += ["", "[[concepts]]"]
        for f in dataclasses.fields(ConceptConfig):
            lines.append(f"{f.name} = {_toml_value(getattr(c, f.name))}")
    return "\n".join(lines) + "\n"


def method_defaults_text(name: str) -> str:
    """One option's default for each registered method, e.g. "dreambooth 5e-06, lora 0.0001"."""
    from .methods import get_method, method_names

    return ", ".join(f"{m} {get_method(m).defaults[name]!r}" for m in method_names())


def options_help() -> list[tuple[str, str, Any, str]]:
    """(section, name, default, help) for every option, for the CLI's --help and the README.

    The default is None for options whose default is the method's; their help lists each method's.
    A method's own options come under the section `[<method>]`.
    """
    from .methods import get_method, method_names

    rows = []
    classes = [(None, TrainConfig)] + [(f"[{m}]", get_method(m).Options) for m in method_names()
                                        if get_method(m).Options is not None] + [(None, ConceptConfig)]
    for table, cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in STRUCTURED:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata["help"]
            if default is None:
                help_text += f" Default: {method_defaults_text(f.name)}."
            if f.metadata.get("choices"):
                help_text += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append((table or f.metadata["section"], f.name, default, help_text))
    return rows
