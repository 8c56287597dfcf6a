"""The `eval`, `bench` and `metrics` subcommands of `dreamtune` (added by `register`)."""

from __future__ import annotations

import argparse
import json

from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, KID_FEATURES
from .report import METRICS, text_table


def _scorer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dino-model", default=None, metavar="ID_OR_PATH", help=f"DINO model for DINO, PRES and DIV (default {DEFAULT_DINO_MODEL})")
    p.add_argument("--clip-model", default=None, metavar="ID_OR_PATH", help=f"CLIP model for CLIP-I and CLIP-T (default {DEFAULT_CLIP_MODEL})")
    p.add_argument("--offline", action="store_true", help="load the scoring models from the local cache only")
    p.add_argument("--device", default=None, help="device of the models, e.g. cpu or cuda (default: cuda when present)")
    p.add_argument("--kid", action="store_true", help="also compute KID (needs many images to mean much)")
    p.add_argument("--kid-features", default="auto", choices=KID_FEATURES,
                   help="KID features: auto (Inception via timm when available, else DINO), inception, dino or clip")
    p.add_argument("--kid-model", default=None, metavar="ID_OR_PATH", help="model for the KID features (default: that feature's default)")


def _print_summary(result: dict) -> None:
    summary = result.get("summary", {})
    columns = [(k, title) for k, title, _ in METRICS if summary.get(k) is not None]
    print(text_table([summary], columns))
    for note in result.get("notes", []):
        print(note)


def cmd_eval(args: argparse.Namespace) -> int:
    """`dreamtune eval RUN`: render, score and report a run."""
    from pathlib import Path

    from .runner import artifact_config, evaluate_run

    live = {"live": True, "object": False}.get(args.subject_kind)
    config = None
    if not (Path(args.run).expanduser() / "config.toml").is_file() and args.real_images:
        # An artifact alone (also one trained elsewhere): the subject comes from the flags.
        config = artifact_config(args.run, real_images=args.real_images, base=args.base, class_noun=args.class_noun,
                                 identifier=args.identifier, resolution=args.resolution)
    result = evaluate_run(
        args.run, prompts=args.prompts, images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance=args.guidance, live=live, real_images=args.real_images, concept_index=args.concept, dino_model=args.dino_model,
        clip_model=args.clip_model, offline=args.offline, device=args.device, pres=not args.no_pres, kid=args.kid,
        kid_features=args.kid_features, kid_model=args.kid_model, batch_size=args.batch_size, output_dir=args.out,
        embed_images=not args.link_images, progress=not args.quiet, config=config,
    )
    _print_summary(result)
    out = args.out or f"{args.run}/eval"
    print(f"rendered {result['rendered']} new images; reports in {out}/ (metrics.json, report.md, report.html)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`dreamtune bench SPEC.toml`: run or resume a benchmark."""
    from .bench import load_spec, run_bench

    spec = load_spec(args.spec)
    if args.offline:
        spec.metrics["offline"] = True
    if args.device:
        spec.metrics["device"] = args.device
    run_bench(spec, progress=not args.quiet, max_cells=args.max_cells)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """`dreamtune metrics IMAGES REFERENCES`: score a folder of images against reference images."""
    from .runner import score_folders

    result = score_folders(args.images, args.references, prompt=args.prompt, identifier=args.identifier,
                           class_noun=args.class_noun, dino_model=args.dino_model, clip_model=args.clip_model,
                           offline=args.offline, device=args.device, kid=args.kid, kid_features=args.kid_features,
                           kid_model=args.kid_model, output_dir=args.out)
    if args.json:
        print(json.dumps(result["summary"], indent=2, sort_keys=True))
    else:
        _print_summary(result)
    return 0


def register(subparsers) -> None:
    """Add `eval`, `bench` and `metrics` to the `dreamtune` command."""
    p = subparsers.add_parser("eval", help="render a run's evaluation prompts, score them (DINO, CLIP-I, CLIP-T, ...), write reports",
                              description="Render the evaluation prompts with a run's artifact, score them against the subject's "
                                          "images and write RUN/eval/metrics.json, report.md and report.html. Images already "
                                          "rendered with the same seed and settings are reused.")
    p.add_argument("run", help="run folder (with config.toml and artifact/), or an artifact alone with --real-images")
    p.add_argument("--prompts", default="dreambench",
                   help="'dreambench' (built-in 25 DreamBench-style prompts), a file with one prompt per line "
                        "({identifier} and {class_noun} are filled in), or google/dreambooth's prompts_and_classes.txt")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's validation_inference_steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's validation_guidance_scale)")
    p.add_argument("--subject-kind", choices=("auto", "live", "object"), default="auto",
                   help="which built-in list: live subjects get accessorisation prompts (auto: dogs and cats are live)")
    p.add_argument("--concept", type=int, default=0, help="which of the run's concepts to evaluate (0: the first)")
    p.add_argument("--real-images", default=None, metavar="DIR", help="the subject's real images (default: the run's instance_data_dir)")
    p.add_argument("--base", default=None, help="for an artifact without a run folder: its base model, when it does not record one")
    p.add_argument("--class-noun", default="", help="for an artifact without a run folder: the subject's class (else its model card's)")
    p.add_argument("--identifier", default="", help="for an artifact without a run folder: the subject's identifier (else its token)")
    p.add_argument("--resolution", type=int, default=None, help="for an artifact without a run folder: image size (default 512)")
    p.add_argument("--no-pres", action="store_true", help="skip PRES (rendering the class prompt)")
    p.add_argument("--batch-size", type=int, default=8, help="images rendered per batch")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default RUN/eval)")
    p.add_argument("--link-images", action="store_true", help="link images from the HTML instead of embedding thumbnails")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _scorer_options(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("bench", help="DreamBench protocol over subjects x methods (resumable), Table 1 and a CSV",
                              description="Train, render and score every subject x method cell of a bench spec. Every key is "
                                          "explained in examples/bench-dreambench.toml; examples/bench-world.toml runs the "
                                          "shapes world offline with its oracle. Finished cells are skipped when run again.")
    p.add_argument("spec", help="bench spec (TOML)")
    p.add_argument("--max-cells", type=int, default=None, help="compute at most this many cells now")
    p.add_argument("--offline", action="store_true", help="load the scoring models from the local cache only")
    p.add_argument("--device", default=None, help="device of the scoring models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser("metrics", help="score a folder of images against a folder of reference images",
                              description="DINO and CLIP-I against the references; CLIP-T from --prompt or a .txt caption beside "
                                          "each image (the identifier replaced by --class-noun); DIV among images of one prompt.")
    p.add_argument("images", help="folder of generated images")
    p.add_argument("references", help="folder of real images of the subject")
    p.add_argument("--prompt", default=None, help="the prompt of every image (else .txt captions, else no CLIP-T)")
    p.add_argument("--identifier", default="", help="the subject's identifier, replaced by --class-noun for CLIP-T")
    p.add_argument("--class-noun", default="", help="the subject's class noun")
    p.add_argument("--out", default=None, metavar="DIR", help="also write metrics.json, report.md and report.html here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _scorer_options(p)
    p.set_defaults(func=cmd_metrics)
