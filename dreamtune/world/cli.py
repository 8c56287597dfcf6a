"""The shapes world's commands: `dreamtune demo` and `dreamtune world {pretrain,export,subjects,quality,compare,oracle-check}`.

The main CLI calls `register(subparsers)`; every parser sets `func=handler`, `handler(args) -> int`.
Heavy imports happen inside the handlers so that `dreamtune --help` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DreamtuneError


def register(subparsers) -> None:
    """Add the `demo` command and the `world` command group to an argparse subparsers object."""
    from . import render
    demo = subparsers.add_parser(
        "demo",
        help="Personalize the shipped shapes-world model on one of its subjects and compare with the base model.",
        description="Teaches the shipped tiny base model one shipped subject (DreamBooth with prior preservation, "
        "and Custom Diffusion beside it), samples the subject's prompts, and prints oracle metrics for the base "
        "model and each personalized one; writes a PNG grid and an HTML report. About 3 minutes on 2 CPU cores.",
    )
    demo.add_argument("--subject", default="striped_star",
                      help="Subject to learn: a shipped one (`dreamtune world subjects --list`) or a generated one, "
                      "gen-<seed>-<k> (`dreamtune world subjects --generate N --seed S`).")
    demo.add_argument("--method", default="all",
                      help="'dreambooth', 'custom_diffusion', or 'all' (every available method side by side).")
    demo.add_argument("--steps", type=int, default=None, help="Training steps per method (default: each method's demo setting, DreamBooth 400). "
                      "The finer patterns (banded_triangle, dashed_ring, checker_square) want about 800.")
    demo.add_argument("--output-dir", default="dreamtune-demo", help="Folder for the runs, the grid and the report.")
    demo.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    demo.add_argument("--seed", type=int, default=0, help="Seed for training and sampling.")
    demo.add_argument("--model", default=None, help="A shapes-world pipeline folder (default: the shipped model).")
    demo.add_argument("--images-per-prompt", type=int, default=8,
                      help="Images sampled per prompt for the scores (fewer: quicker, wider intervals).")
    demo.add_argument("--jobs", type=int, default=None,
                      help="Worker processes that train and score the models side by side (default: one per core, "
                      "at most one per model); 1 runs everything in this process, with progress bars.")
    demo.set_defaults(func=_demo)

    world = subparsers.add_parser("world", help="The shapes world: pretrain its base model, write subjects, measure quality.")
    commands = world.add_subparsers(dest="world_command",
                                    metavar="{pretrain,export,subjects,quality,compare,oracle-check}")
    commands.required = True

    pre = commands.add_parser("pretrain", help="Train a shapes-world base model (a diffusers pipeline folder).")
    pre.add_argument("--output-dir", required=True, help="Run folder: checkpoints, log, and the pipeline in <dir>/pipeline.")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--vae-steps", type=int, default=None, help="Steps of the VAE phase.")
    pre.add_argument("--text-steps", type=int, default=None,
                     help="Steps of the text encoder's own (contrastive) phase; 0 trains it with the UNet instead.")
    pre.add_argument("--unet-steps", type=int, default=None, help="Steps of the UNet phase.")
    pre.add_argument("--batch-size", type=int, default=None)
    pre.add_argument("--learning-rate", type=float, default=None, help="Peak learning rate of the UNet phase.")
    pre.add_argument("--object-weight", type=float, default=None,
                     help="Loss weight of the object's latent pixels (background: 1); may change when resuming.")
    pre.add_argument("--minutes", type=float, default=None, help="Stop (after a checkpoint) once this much time has passed.")
    pre.add_argument("--no-resume", action="store_true", help="Start over instead of resuming from <output-dir>/checkpoints.")
    pre.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine).")
    pre.add_argument("--vae-from", default=None,
                     help="Where the VAE comes from: '' (default) trains it first; 'shipped' (the shipped model's "
                     "VAE) or a pipeline or VAE folder skips that phase.")
    pre.add_argument("--init-from", default=None,
                     help="Continue from another world pipeline folder (tensors whose names and shapes match).")
    pre.add_argument("--unet-channels", default=None, help="UNet block channels, e.g. 48,96,128.")
    pre.add_argument("--warmup-steps", type=int, default=None)
    pre.add_argument("--pooled-prompt", action=argparse.BooleanOptionalAction, default=None,
                     help="Also give the UNet the pooled prompt in its time embedding, as SDXL does (default: "
                     "no; the prompt goes in through cross-attention only, as in SD 1.x/2.x).")
    pre.add_argument("--rare-words", choices=render.RARE_WORD_MODES, default=None,
                     help="How rare words enter captions: 'instances' (default), each names one patterned object, "
                     "as names and brands do in web captions; 'noise', random rare words that name nothing "
                     "(the data of runs before it).")
    pre.add_argument("--pattern-share", type=float, default=None,
                     help="Share of the scenes other than named instances that carry a two-colour pattern "
                     "(default 0.4; runs with --rare-words noise used 0.5).")
    pre.add_argument("--plain-steps", type=int, default=None,
                     help="The UNet phase's first N steps see plain, unnamed objects only (a plain first stage; "
                     "default 0).")
    pre.add_argument("--text-negatives", action=argparse.BooleanOptionalAction, default=None,
                     help="Train the text encoder with hard-negative captions too: each caption's object colour "
                     "swapped for another.")
    pre.add_argument("--text-joint-lr", type=float, default=None,
                     help="After its own phase, keep training the text encoder with the UNet at this learning rate "
                     "(default 0: frozen).")
    pre.set_defaults(func=_pretrain)

    export = commands.add_parser("export", help="Write a pipeline folder from a pretraining run's latest checkpoint "
                                 "(EMA weights, fp16), finished or not.")
    export.add_argument("run", help="The pretraining run folder (--output-dir of `world pretrain`).")
    export.add_argument("--out", required=True, help="Pipeline folder to write (refused when it exists).")
    export.add_argument("--fp32", action="store_true", help="Keep float32 weights (default: fp16 files).")
    export.set_defaults(func=_export)

    compare = commands.add_parser(
        "compare", help="Train and score every method on the same subjects; one table with confidence intervals.",
        description="For each subject: the base model, DreamBooth with and without prior preservation, Custom "
        "Diffusion, Textual Inversion and LoRA with the world's settings; for the first two subjects also Custom "
        "Diffusion trained jointly on both and the merge of their single runs. Resumes an existing output folder.")
    compare.add_argument("--subjects", default="striped_star,gen-0-0",
                         help="Comma-separated subject names: shipped ones or generated ones (gen-SEED-K).")
    compare.add_argument("--models", default=None,
                         help="Comma-separated subset of: base model, dreambooth, dreambooth, no prior, custom_diffusion, "
                         "textual_inversion, lora (default: all).")
    compare.add_argument("--output-dir", default="dreamtune-compare")
    compare.add_argument("--images-per-prompt", type=int, default=8)
    compare.add_argument("--steps", type=int, default=None, help="Training steps of every method (default: each one's).")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--no-pairs", action="store_true", help="Skip the two-concept (joint and merged) rows.")
    compare.add_argument("--model", default=None, help="A shapes-world pipeline folder (default: the shipped model).")
    compare.add_argument("--jobs", type=int, default=None,
                         help="Worker processes that train and score cells side by side (default: one per core); "
                         "1 runs everything in this process, with progress bars.")
    compare.set_defaults(func=_compare)

    subjects = commands.add_parser("subjects", help="Write a subject's reference images (PNG) to a folder.")
    subjects.add_argument("--out", help="Folder to write into (one subfolder per subject with --subject all).")
    subjects.add_argument("--subject", default="all",
                          help="Subject name (a shipped one, or a generated one as gen-<seed>-<k>), or 'all'.")
    subjects.add_argument("--captions", action="store_true", help="Also write a .txt caption beside each image.")
    subjects.add_argument("--list", action="store_true", help="List the subjects and exit.")
    subjects.add_argument("--generate", type=int, default=None, metavar="N",
                          help="Work on N new subjects drawn from combinations pretraining never showed "
                          "(named gen-<seed>-<k>) instead of the shipped ones: list them, or write them with --out.")
    subjects.add_argument("--seed", type=int, default=0, help="Seed of --generate.")
    subjects.set_defaults(func=_subjects)

    quality = commands.add_parser("quality", help="Measure a base model with the oracle on held-out prompts.",
                                  description="Samples prompts built from colour-class pairs held out of pretraining, "
                                  "and from pairs it saw, each with a background and size, and prints the share of "
                                  "images that honour each attribute with a 95% bootstrap interval, beside the share "
                                  "of images showing a two-colour object.")
    quality.add_argument("--model", default=None, help="Pipeline folder (default: the shipped model).")
    quality.add_argument("--steps", type=int, default=25, help="Sampling steps.")
    quality.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the model's).")
    quality.add_argument("--images-per-prompt", type=int, default=8)
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    quality.set_defaults(func=_quality)

    check = commands.add_parser("oracle-check", help="Measure the oracle's per-attribute accuracy on clean and perturbed renders.",
                                description="Draws seeded random scenes twice, clean and perturbed the way fine-tuned "
                                "models draw (bent shapes, irregular and broken patterns, shifted colours, blur, noise, "
                                "JPEG blocks, slight shifts), reads them with the oracle and prints its accuracy per attribute.")
    check.add_argument("--count", type=int, default=600, help="Number of scenes.")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--strength", type=float, default=1.0, help="Scale of every perturbation (1: the validated level).")
    check.add_argument("--vae", nargs="?", const=True, default=None, metavar="MODEL",
                       help="Also read the clean renders after a VAE round trip (the shipped model's, or MODEL's).")
    check.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    check.set_defaults(func=_oracle_check)


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
    if args.vae_from is not None:
        overrides["vae_from"] = args.vae_from
    if args.init_from:
        overrides["init_from"] = str(Path(args.init_from).expanduser().resolve())
    if args.warmup_steps is not None:
        overrides["warmup_steps"] = args.warmup_steps
    for setting in ("text_steps", "plain_steps", "text_joint_lr"):  # options that must not be negative
        value = getattr(args, setting)
        if value is not None:
            if value < 0:
                raise DreamtuneError(f"--{setting.replace('_', '-')} must be 0 or more, got {value}")
            overrides[setting] = value
    if args.pooled_prompt is not None:
        overrides["text_time_embedding"] = args.pooled_prompt
    if args.rare_words is not None:
        overrides["rare_words"] = args.rare_words
    if args.pattern_share is not None:
        if not 0.0 <= args.pattern_share <= 1.0:
            raise DreamtuneError(f"--pattern-share must be between 0 and 1, got {args.pattern_share}")
        overrides["pattern_share"] = args.pattern_share
    if args.text_negatives is not None:
        overrides["text_negatives"] = args.text_negatives
    if args.unet_channels:
        try:
            overrides["unet_channels"] = tuple(int(c) for c in args.unet_channels.split(","))
        except ValueError:
            raise DreamtuneError(f"--unet-channels: expected numbers like 48,96,128, got {args.unet_channels!r}") from None
    path = pretrain(args.output_dir, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                    batch_size=args.batch_size, learning_rate=args.learning_rate, minutes=args.minutes,
                    resume=not args.no_resume, threads=args.threads, **overrides)
    print(f"pipeline: {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .pretrain import export_checkpoint

    out = Path(args.out).expanduser()
    if out.exists():
        raise DreamtuneError(f"--out {out} exists; name a new folder")
    print(f"pipeline: {export_checkpoint(args.run, out, fp16=not args.fp32)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    _positive(args.images_per_prompt, "--images-per-prompt")
    _positive(args.steps, "--steps")
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    models = None
    if args.models:
        # "dreambooth, no prior" holds a comma: rejoin it before splitting the list.
        models = [m.strip() for m in args.models.replace("dreambooth, no prior", "dreambooth-no-prior").split(",")]
        models = ["dreambooth, no prior" if m == "dreambooth-no-prior" else m for m in models if m]
    _positive(args.jobs, "--jobs")
    run_compare(subjects, models=models, output_dir=args.output_dir, seed=args.seed,
                images_per_prompt=args.images_per_prompt, steps=args.steps, pairs=not args.no_pairs, model=args.model,
                jobs=args.jobs)
    return 0


def _subjects(args: argparse.Namespace) -> int:
    from .subjects import SUBJECTS, generate_subjects, get_subject, write_subject_images

    if args.generate is not None:
        if args.generate < 1:
            raise DreamtuneError(f"--generate must be at least 1, got {args.generate}")
        pool = generate_subjects(args.generate, args.seed)
    else:
        pool = list(SUBJECTS.values())
    if args.list or (args.generate is not None and not args.out):
        for subject in pool:
            print(f"{subject.name:<16} {subject.class_noun:<9} variant {subject.variant}  {subject.description}")
        return 0
    if not args.out:
        raise DreamtuneError("world subjects: --out DIR is required (or --list)")
    chosen = pool if args.subject == "all" else [get_subject(args.subject)]
    out = Path(args.out)
    for subject in chosen:
        folder = out / subject.name if args.subject == "all" else out
        paths = write_subject_images(subject, folder, captions=args.captions)
        print(f"{subject.name}: {len(paths)} images in {folder}")
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


def _oracle_check(args: argparse.Namespace) -> int:
    from ..io import write_json
    from .perturb import format_oracle_accuracy, oracle_accuracy

    _positive(args.count, "--count")
    if args.strength < 0:
        raise DreamtuneError(f"--strength must be 0 or more, got {args.strength}")
    result = oracle_accuracy(args.count, args.seed, args.strength, vae_model=args.vae)
    print(format_oracle_accuracy(result))
    if args.json:
        write_json(args.json, result)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _positive(args.steps, "--steps")
    _positive(args.images_per_prompt, "--images-per-prompt")
    _positive(args.jobs, "--jobs")
    run_demo(subject=args.subject, method=args.method, steps=args.steps, output_dir=args.output_dir,
             overwrite=args.overwrite, seed=args.seed, model=args.model, images_per_prompt=args.images_per_prompt,
             jobs=args.jobs)
    return 0
