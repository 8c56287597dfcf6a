"""A run folder's state, the lock that keeps one writer in it, and what a resume may change.

A run folder is finished (its artifact is written), in progress (something written, no artifact)
or empty. Training decides what to do from that state before it writes anything, holds an OS lock
on the folder while it runs (released by the OS on any exit, kill -9 included), and on resume
compares the new config with the run's `config.toml`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import DreamtuneError

logger = logging.getLogger(__name__)

FINISHED, IN_PROGRESS, EMPTY = "finished", "in progress", "empty"
LOCK_FILE = ".dreamtune.lock"
HISTORY_PREFIX = "# resumed at step "

# Options that do not change the trained weights: a resume may change them freely. Every other
# option changes the trajectory (learning rate, schedule, seed, batch, data, method, base...).
FREE_OPTIONS = frozenset({
    "output_dir", "validation_prompts", "validation_steps", "num_validation_images", "validation_inference_steps",
    "validation_guidance_scale", "logging_steps", "report_to", "checkpointing_steps", "checkpoints_total_limit",
    "cache_latents", "cache_text_embeddings", "cache_to_disk", "cache_dir", "attention", "gradient_checkpointing", "sample_batch_size",
    "custom_diffusion.compress_rank",
})


def run_state(output_dir: str | os.PathLike) -> str:
    """FINISHED when the run's artifact is written, EMPTY when nothing is there, else IN_PROGRESS."""
    from .artifacts import METADATA_FILE

    output_dir = Path(output_dir)
    if (output_dir / "artifact" / METADATA_FILE).is_file():
        return FINISHED
    if not output_dir.is_dir() or not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
        return EMPTY
    return IN_PROGRESS


@dataclass
class RunPlan:
    """What `train` does with a run folder: start fresh (clearing it first or not), resume, or nothing."""

    action: str  # "fresh", "resume" or "finished"
    checkpoint: Path | None = None
    clear: bool = False


def plan_run(output_dir: Path, *, resume: str | None, overwrite: bool) -> RunPlan:
    """Decide from the folder's state, before anything is written, what a training call may do.

    `--resume latest` on a finished run changes nothing; on a folder without a checkpoint it refuses
    unless `--overwrite` says to start over. Without `--resume`, a non-empty folder needs `--overwrite`.
    """
    from .checkpoints import newest_good_checkpoint

    state = run_state(output_dir)
    if not resume:
        if state == EMPTY:
            return RunPlan("fresh")
        if not overwrite:
            what = "a finished run" if state == FINISHED else "a run in progress" if _has_checkpoints(output_dir) else "files"
            raise DreamtuneError(
                f"output_dir '{output_dir}' is not empty (it holds {what}): pass --resume latest to continue that run, "
                "--overwrite to start it over, or choose another --output-dir."
            )
        return RunPlan("fresh", clear=True)
    explicit = resume != "latest"
    if state == FINISHED and not (explicit and overwrite):
        if explicit:
            raise DreamtuneError(
                f"output_dir '{output_dir}' holds a finished run: resuming from {resume} would replace its artifact. "
                "Add --overwrite to allow that, or choose another --output-dir."
            )
        return RunPlan("finished")
    if explicit:
        from .checkpoints import checkpoint_problem

        checkpoint = Path(resume).expanduser()
        problem = checkpoint_problem(checkpoint) if (checkpoint / "state.json").is_file() else None
        if problem is not None:
            raise DreamtuneError(f"{checkpoint}: the checkpoint is damaged ({problem}). Resume from an earlier "
                                 "checkpoint, or use --resume latest to pick the newest one that is whole.")
        return RunPlan("resume", checkpoint=checkpoint)
    checkpoint = newest_good_checkpoint(output_dir)
    if checkpoint is not None:
        return RunPlan("resume", checkpoint=checkpoint)
    if overwrite:
        return RunPlan("fresh", clear=state != EMPTY)
    if state == EMPTY:
        raise DreamtuneError(
            f"--resume latest: output_dir '{output_dir}' is empty, there is no run to resume. Drop --resume to start "
            "a new run, or check --output-dir."
        )
    raise DreamtuneError(
        f"--resume latest: output_dir '{output_dir}' holds a run with no checkpoint to resume from. Pass --overwrite "
        "to start it over (its files are removed), or choose another --output-dir."
    )


def _has_checkpoints(output_dir: Path) -> bool:
    from .checkpoints import list_checkpoints

    return bool(list_checkpoints(output_dir))


def clear_run(output_dir: Path, keep_entries: frozenset[str]) -> None:
    """Remove an earlier run's files before starting over; refuse when the folder holds anything else."""
    strangers = [p.name for p in output_dir.iterdir() if p.name not in keep_entries and not p.name.startswith(".")]
    if strangers:
        raise DreamtuneError(
            f"output_dir '{output_dir}' holds files that are not from a dreamtune run ({', '.join(sorted(strangers)[:3])}); "
            "--overwrite only clears run folders. Choose another --output-dir."
        )
    for entry in output_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


class FolderLock:
    """An exclusive OS file lock on a folder, held by one process at a time.

    The OS releases it when the process ends however it ends, so a lock file left behind by a
    killed process is recognised as stale (nobody holds it) and taken over. `wait=True` blocks
    until the holder is done instead of refusing.
    """

    def __init__(self, lock_path: Path, what: str):
        self.path = Path(lock_path)
        self.what = what
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            previous = _read_holder(fd)
            locked = _try_lock(fd, wait=False)
            if not locked and wait:
                logger.warning("%s is in use by another dreamtune process (%s); waiting for it to finish",
                               self.what, previous or "unknown")
                locked = _try_lock(fd, wait=True)
            if not locked:
                os.close(fd)
                holder = f" ({previous})" if previous else ""
                raise DreamtuneError(
                    f"{self.what} is in use by another dreamtune process{holder}. Wait for it to finish, or "
                    "choose another folder."
                )
            # The file may have been removed by the holder that just released it; lock the live one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if previous and previous != _me():
            logger.info("%s: took over the lock left by %s, which is no longer running", self.path, previous)
        os.ftruncate(fd, 0)
        os.write(fd, _me().encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held, so a process that waits on it re-checks and locks a fresh file.
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


RUN_SUBFOLDERS = ("checkpoints", "samples", "logs")


def remove_run_leftovers(output_dir: Path) -> None:
    """Remove what a killed process half-wrote in a run folder (call it holding the run's lock)."""
    from .io import remove_leftovers

    output_dir = Path(output_dir)
    remove_leftovers(output_dir, *(output_dir / name for name in RUN_SUBFOLDERS))


def run_lock(output_dir: Path) -> FolderLock:
    """The lock of a run folder (a hidden file inside it, removed when the run ends)."""
    return FolderLock(Path(output_dir) / LOCK_FILE, f"output_dir '{output_dir}'")


def _me() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _try_lock(fd: int, *, wait: bool) -> bool:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


# --- what a resume may change -------------------------------------------------------------------


def _comparable(name: str, value):
    """Paths compare by where they point, so './photos' and '/home/me/photos' are the same option."""
    if isinstance(value, str) and value and (name.endswith(("_dir", "_path")) or name == "pretrained_model_name_or_path"):
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
    return value


def config_changes(old, new) -> list[tuple[str, object, object]]:
    """(option, old value, new value) for every option that differs between two TrainConfigs."""
    from .config import ConceptConfig, TrainConfig

    changes = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "concepts":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a) and type(a) is type(b):
            # The method's own options ([lora] rank...), named as they are set: lora.rank.
            changes += [(f"{new.method}.{g.name}", getattr(a, g.name), getattr(b, g.name))
                        for g in dataclasses.fields(a) if getattr(a, g.name) != getattr(b, g.name)]
        elif _comparable(f.name, a) != _comparable(f.name, b):
            changes.append((f.name, a, b))
    if len(old.concepts) != len(new.concepts):
        changes.append(("concepts", f"{len(old.concepts)} concepts", f"{len(new.concepts)} concepts"))
        return changes
    for i, (ca, cb) in enumerate(zip(old.concepts, new.concepts)):
        for f in dataclasses.fields(ConceptConfig):
            a, b = getattr(ca, f.name), getattr(cb, f.name)
            if _comparable(f.name, a) != _comparable(f.name, b):
                changes.append((f"concepts[{i}].{f.name}", a, b))
    return changes


def read_run_config(output_dir: Path):
    """The TrainConfig recorded in a run's config.toml, or None when there is none to compare with."""
    from .config import load_config

    path = Path(output_dir) / "config.toml"
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except DreamtuneError as e:
        logger.warning("%s cannot be compared with the new config (%s)", path, e)
        return None


def check_resume_config(output_dir: Path, config, *, step: int, accept_changes: bool) -> list[tuple[str, object, object]]:
    """Refuse a resume whose config changes the trajectory, unless `accept_changes`; returns those changes."""
    old = read_run_config(output_dir)
    if old is None:
        return []
    changes = [c for c in config_changes(old, config) if c[0] not in FREE_OPTIONS]
    if changes and not accept_changes:
        listed = ", ".join(f"{name} {a!r} -> {b!r}" for name, a, b in changes)
        raise DreamtuneError(
            f"--resume: the config differs from the run's {Path(output_dir) / 'config.toml'} in options that change "
            f"the result: {listed}. Resume with the run's values, or pass --resume-with-changes to apply the new ones "
            f"from step {step}."
        )
    return changes


def config_toml_with_history(output_dir: Path, new_toml: str, *, step: int,
                             changes: list[tuple[str, object, object]]) -> str:
    """The new config.toml text, keeping the record of earlier resumes with changes and adding this one."""
    history = []
    path = Path(output_dir) / "config.toml"
    if path.is_file():
        history = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith(HISTORY_PREFIX)]
    if changes:
        listed = ", ".join(f"{name} = {a!r} -> {b!r}" for name, a, b in changes)
        history.append(f"{HISTORY_PREFIX}{step} with changes (before -> after): {listed}")
    if not history:
        return new_toml
    first, _, rest = new_toml.partition("\n")
    return "\n".join([first, *history]) + "\n" + rest
