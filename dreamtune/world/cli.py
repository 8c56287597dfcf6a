"""The shapes world's commands: `dreamtune demo` and `dreamtune world {pretrain,subjects,quality}`.

The main CLI calls `register(subparsers)`; every parser sets `func=handler`, `handler(args) -> int`.
Heavy imports happen inside the handlers so that `dreamtune --help` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DreamtuneError


def register(subparsers) -> None:
    """Add the `demo` command and the `world` command group to an argparse subparsers object."""
    demo = subparsers.add_parser(
        "demo",
        help="Personalize the shipped shapes-world model on one of its subjects and compare with the base model.",
        description="Teaches the shipped tiny base model one shipped subject (DreamBooth with prior preservation, "
        "and Custom Diffusion beside it), samples the subject's prompts, and prints oracle metrics for the base "
        "model and each personalized one; writes a PNG grid and an HTML report. About 3 minutes on 2 CPU cores.",
    )
    demo.add_argument("--subject", default="striped_star", help="Shipped subject to learn (see `dreamtune world subjects --list`).")
    demo.add_argument("--method", default="all",
                      help="'dreambooth', 'custom_diffusion', or 'all' (every available method side by side).")
    demo.add_argument("--steps", type=int, default=None, help="Training steps per method (default: each method's demo setting, DreamBooth 400). "
                      "The finer patterns (banded_triangle, dashed_ring, checker_square) want about 800.")
    demo.add_argument("--output-dir", default="dreamtune-demo", help="Folder for the runs, the grid and the report.")
    demo.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    demo.add_argument("--seed", type=int, default=0, help="Seed for training and sampling.")
    demo.set_defaults(func=_demo)

    world = subparsers.add_parser("world", help="The shapes world: pretrain its base model, write subjects, measure quality.")
    commands = world.add_subparsers(dest="world_command", metavar="{pretrain,subjects,quality}")
    commands.required = True

    pre = commands.add_parser("pretrain", help="Train a shapes-world base model (a diffusers pipeline folder).")
    pre.add_argument("--output-dir", required=True, help="Run folder: checkpoints, log, and the pipeline in <dir>/pipeline.")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--vae-steps", type=int, default=None, help="Steps of the VAE phase.")
    pre.add_argument("--unet-steps", type=int, default=None, help="Steps of the UNet + text encoder phase.")
    pre.add_argument("--batch-size", type=int, default=None)
    pre.add_argument("--learning-rate", type=float, default=None, help="Peak learning rate of the UNet phase.")
    pre.add_argument("--object-weight", type=float, default=None,
                     help="Loss weight of the object's latent pixels (background: 1); may change when resuming.")
    pre.add_argument("--minutes", type=float, default=None, help="Stop (after a checkpoint) once this much time has passed.")
    pre.add_argument("--no-resume", action="store_true", help="Start over instead of resuming from <output-dir>/checkpoints.")
    pre.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine).")
    pre.set_defaults(func=_pretrain)

    subjects = commands.add_parser("subjects", help="Write a subject's reference images (PNG) to a folder.")
    subjects.add_argument("--out", help="Folder to write into (one subfolder per subject with --subject all).")
    subjects.add_argument("--subject", default="all", help="Subject name, or 'all'.")
    subjects.add_argument("--captions", action="store_true", help="Also write a .txt caption beside each image.")
    subjects.add_argument("--list", action="store_true", help="List the subjects and exit.")
    subjects.set_defaults(func=_subjects)

    quality = commands.add_parser("quality", help="Measure a base model with the oracle on held-out prompts.")
    quality.add_argument("--model", default=None, help="Pipeline folder (default: the shipped model).")
    quality.add_argument("--steps", type=int, default=25, help="Sampling steps.")
    quality.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the model's).")
    quality.add_argument("--images-per-prompt", type=int, default=4)
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    quality.set_defaults(func=_quality)


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise DreamtuneError(f"{option} must be at least 1, got {value}")


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    for option in ("vae_steps", "unet_steps", "batch_size", "threads"):
        _positive(getattr(args, option), "--" + option.replace("_", "-"))
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise DreamtuneError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.object_weight is not None and args.object_weight <= 0:
        raise DreamtuneError(f"--object-weight must be positive, got {args.object_weight}")
    overrides = {} if args.object_weight is None else {"object_weight": args.object_weight}
    path = pretrain(args.output_dir, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                    batch_size=args.batch_size, learning_rate=args.learning_rate, minutes=args.minutes,
                    resume=not args.no_resume, threads=args.threads, **overrides)
    print(f"pipeline: {path}")
    return 0


def _subjects(args: argparse.Namespace) -> int:
    from .subjects import SUBJECTS, get_subject, write_subject_images

    if args.list:
        for subject in SUBJECTS.values():
            print(f"{subject.name:<16} {subject.class_noun:<9} {subject.description}")
        return 0
    if not args.out:
        raise DreamtuneError("world subjects: --out DIR is required (or --list)")
    names = list(SUBJECTS) if args.subject == "all" else [get_subject(args.subject).name]
    out = Path(args.out)
    for name in names:
        folder = out / name if args.subject == "all" else out
        paths = write_subject_images(name, folder, captions=args.captions)
        print(f"{name}: {len(paths)} images in {folder}")
    return 0


def _quality(args: argparse.Namespace) -> int:
    from ..io import write_json
    from .quality import DEFAULT_GUIDANCE, format_quality, measure_quality

    _positive(args.steps, "--steps")
    _positive(args.images_per_prompt, "--images-per-prompt")
    result = measure_quality(args.model, steps=args.steps, guidance=args.guidance or DEFAULT_GUIDANCE,
                             images_per_prompt=args.images_per_prompt, seed=args.seed)
    print(format_quality(result))
    if args.json:
        write_json(args.json, result)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _positive(args.steps, "--steps")
    run_demo(subject=args.subject, method=args.method, steps=args.steps, output_dir=args.output_dir,
             overwrite=args.overwrite, seed=args.seed)
    return 0
