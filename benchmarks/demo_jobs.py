"""Wall time of `dreamtune demo` with its models in worker processes against all in one process.

    python -m benchmarks.demo_jobs                    # the default demo (striped star, 8 images per prompt)
    python -m benchmarks.demo_jobs --images-per-prompt 2 --steps 100

Runs the demo twice in one go, first with `--jobs 1` (one process, torch's default threads), then with
the default (one worker process per core, at most one per model, a thread each), and prints each wall
time and their ratio, with the two runs' figures side by side (they should agree: the workers differ
only in thread count, which can move the last bits of a sum), then the second run's table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from dreamtune.world.demo import default_jobs, format_table, run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", default="striped_star")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)

    times, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in (1, None):
            label = "one process" if jobs == 1 else f"{default_jobs(3)} worker processes"
            started = time.monotonic()
            rows[label] = run_demo(subject=args.subject, steps=args.steps, images_per_prompt=args.images_per_prompt,
                                   output_dir=Path(tmp) / str(jobs), progress=False, quiet=True, jobs=jobs)
            times[label] = time.monotonic() - started
    first, second = times
    for label, seconds in times.items():
        figures = "  ".join(f"{r.name} {r.subject_fidelity:.2f}/{r.prompt_fidelity:.2f}" for r in rows[label])
        print(f"{label:20s} {seconds:6.1f} s   subject/prompt: {figures}")
    print(f"speed-up: {times[first] / times[second]:.2f}x")
    print(f"\nthe demo's table ({second}):")
    print(format_table(rows[second]))


if __name__ == "__main__":
    main()
