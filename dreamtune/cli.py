"""The `dreamtune` command: train, sample, tokens, export, and the commands other modules register."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig, options_help
from .errors import DreamtuneError
from .logs import quiet_libraries

# Modules that add their own subcommands through `register(subparsers)`; a missing one is skipped.
# A method's own commands (Custom Diffusion's merge and retrieve) come from the method registry.
EXTENSIONS = (
    "dreamtune.evaluate.cli",
    "dreamtune.world.cli",
    "dreamtune.ui.cli",
)


def _extensions() -> list[str]:
    from .methods import get_method, method_names

    return list(EXTENSIONS) + [m for name in method_names() for m in get_method(name).commands]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_parser(subparsers) -> None:
    sections: dict[str, list] = {}
    for section, name, default, help_text in options_help():
        sections.setdefault(section, []).append((name, default, help_text))
    epilog = ["every option (set in the TOML file or with --set key=value; concept options in [[concepts]] tables,",
              "a method's own options in its table, e.g. [lora] rank = 8 or --set lora.rank=8):"]
    for section, rows in sections.items():
        epilog.append(f"\n  [{section}]")
        for name, default, help_text in rows:
            epilog.append(f"    {name} = {'(per method)' if default is None else repr(default)}\n        {help_text}")
    p = subparsers.add_parser(
        "train",
        help="train a personalized model from a TOML config",
        description="Train a run. Options come from CONFIG.toml, then --set overrides, then the flags below.",
        epilog="\n".join(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML config file (see examples/dreambooth.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, e.g. --set learning_rate=1e-5 or --set concepts.0.identifier=zwx")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint of output_dir, or a checkpoint folder")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume (latest, unless --resume names a checkpoint) even though options that change the result "
                        "differ from the run's config.toml; the new values apply from the resumed step")
    p.add_argument("--overwrite", action="store_true",
                   help="clear a non-empty output_dir of an earlier run and start over (with --resume: only when there "
                        "is no checkpoint to resume from)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("flag"):
            continue
        default = f.default
        if f.type in ("bool", "bool | None"):
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{f.metadata['help']} (default: {default})")
        else:
            shown = "the method's" if default is None else repr(default)
            p.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                           help=f"{f.metadata['help']} (default: {shown})")
    for name, help_text in (("instance_data_dir", "folder of the subject's images (first concept)"),
                            ("identifier", "the subject's rare identifier, e.g. sks (first concept)"),
                            ("class_noun", "the subject's class, e.g. dog (first concept)"),
                            ("class_data_dir", "folder of class images (first concept)")):
        p.add_argument(_flag(name), dest=f"concept_{name}", default=None, help=help_text)
    p.set_defaults(func=cmd_train)


def build_config(args) -> TrainConfig:
    """The TrainConfig of `dreamtune train`: file, then --set, then flags."""
    import dataclasses

    from .config import load_config

    overrides = list(args.overrides)
    for name in ("instance_data_dir", "identifier", "class_noun", "class_data_dir"):
        value = getattr(args, f"concept_{name}")
        if value is not None:
            overrides.append(f"concepts.0.{name}={value}")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.metadata.get("flag") and getattr(args, f.name, None) is not None}
    return load_config(args.config, overrides=overrides, **values)


def cmd_train(args) -> int:
    from .training import train

    config = build_config(args)
    resume = args.resume or ("latest" if args.resume_with_changes else None)
    result = train(config, overwrite=args.overwrite, resume=resume, progress=not args.no_progress,
                   resume_with_changes=args.resume_with_changes)
    if result.already_finished:
        print(f"run '{result.output_dir}' is already finished (its artifact: {result.artifact_dir}); nothing was "
              "changed. --overwrite trains it again.")
        return 0
    print(f"artifact: {result.artifact_dir}")
    print(f"samples:  {result.output_dir / 'samples'}")
    print(f"sample it: dreamtune sample --weights {result.output_dir} --prompt \"{config.concepts[0].prompt}\"")
    return 0


def cmd_sample(args) -> int:
    from .pipeline import load_pipeline
    from .render import sample_to_folder

    if not args.base and not args.weights:
        raise DreamtuneError("sample: give --base (a model) and/or --weights (a run or artifact).")
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    request = {"prompts": args.prompt, "n": args.n, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
               "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
               "base": args.base, "weights": [str(Path(w).expanduser().resolve()) for w in args.weights],
               "dtype": args.dtype}
    paths, rendered = sample_to_folder(
        request, args.out, lambda: load_pipeline(args.base, *args.weights, torch_dtype=dtype, device=args.device),
        overwrite=args.overwrite)
    out = Path(args.out).expanduser()
    print(f"{len(paths)} images in {out} ({rendered} rendered now)" if rendered < len(paths) else f"{len(paths)} images written to {out}")
    return 0


def cmd_tokens(args) -> int:
    from .pipeline import load_base
    from .tokens import check_identifier, rare_tokens

    tokenizer = _load_tokenizer(args.base) if args.base else None
    if tokenizer is None:
        tokenizer = load_base(args.base).tokenizer
    if args.check:
        problems = check_identifier(tokenizer, args.check)
        print("\n".join(problems) if problems else f"'{args.check}' is a single rare token: a good identifier.")
        return 0
    print("rare single-token identifiers (token, id):")
    for word, idx in rare_tokens(tokenizer, args.n):
        print(f"  {word:8s} {idx}")
    return 0


def _load_tokenizer(base: str):
    """The tokenizer alone from a diffusers folder (fast); None when it must come from the full model."""
    folder = Path(base).expanduser() / "tokenizer"
    if folder.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return None


def cmd_export(args) -> int:
    from .artifacts import read_artifact
    from .export import export

    info = read_artifact(args.weights)
    path = export(info, args.format, Path(args.out), base=args.base, half=args.half, overwrite=args.overwrite)
    print(f"exported {info.method} artifact as {args.format}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dreamtune", description="Teach a Stable Diffusion model your subject.")
    parser.add_argument("--version", action="version", version=f"dreamtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)

    p = sub.add_parser("sample", help="render prompts with a base model and/or trained artifacts")
    p.add_argument("--base", help="base model (folder, hub id or single file); optional when --weights records it")
    p.add_argument("--weights", action="append", default=[], metavar="RUN_OR_ARTIFACT", help="a run or artifact folder (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed+i (default 0)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("tokens", help="list rare single-token identifiers of a model's tokenizer, or check one")
    p.add_argument("--base", required=True, help="base model")
    p.add_argument("-n", type=int, default=20, help="how many to list (default 20)")
    p.add_argument("--check", metavar="WORD", help="check one identifier instead")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("export", help="export an artifact for other tools (single file for A1111/ComfyUI, kohya LoRA)")
    p.add_argument("weights", help="run or artifact folder")
    p.add_argument("--format", choices=("single-file", "kohya"), default="single-file",
                   help="single-file: one .safetensors in the original SD layout (DreamBooth); kohya: LoRA with kohya keys")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--base", help="base model, when the artifact's recorded one has moved")
    p.add_argument("--half", action="store_true", help="store weights in float16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    for module_name in _extensions():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dreamtune` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    if not verbose:
        quiet_libraries()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (DreamtuneError, ConfigError) as e:
        if verbose:
            raise
        print(f"dreamtune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A full disk or a refused write outside dreamtune's own writes: one line, the path and the fix.
        from .io import environment_fault

        fault = environment_fault(e)
        if fault is None or verbose:
            raise
        print(f"dreamtune: error: {fault}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # TrainingStopped says where its checkpoint is; a bare Ctrl-C (outside the steps) says nothing.
        print(f"dreamtune: {str(e) or 'interrupted; a run continues with `dreamtune train ... --resume latest`.'}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
