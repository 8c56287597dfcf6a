"""Run folders seen from the UI, and training jobs run as separate `dreamtune train` processes.

Nothing here needs gradio: the app is a face over these functions, and they only read what the CLI
writes (config.toml, logs/metrics.csv, samples/, checkpoints/, artifact/) plus a small job record
that the UI keeps beside the runs (the command, its process id and its output).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreamtuneError
from ..io import write_json

# The UI's own files under the runs root: job records and logs, uploads, rendered samples.
UI_DIR = ".dreamtune-ui"
UPLOADS = "uploads"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A run folder, or an artifact folder at the top (what `dreamtune merge` writes).
RUN_MARKERS = ("config.toml", "checkpoints", "artifact", "dreamtune.json")
# How `dreamtune train` ends when asked to stop (training.TrainingStopped): not a failure.
STOPPED_LINE = "stopped at step "


def jobs_dir(root: Path) -> Path:
    return Path(root) / UI_DIR / "jobs"


def check_run_name(name: str) -> str:
    """A run name is one folder name: letters, digits, '.', '_' and '-'."""
    name = (name or "").strip()
    if not NAME_RE.match(name) or name == UPLOADS:
        raise DreamtuneError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (not '{UPLOADS}'), "
                             "e.g. 'star-dreambooth'.")
    return name


@dataclass
class RunInfo:
    """What the Runs tab shows of one run folder."""

    name: str
    path: Path
    status: str  # running, finished, stopped, failed, starting, empty
    method: str = ""
    step: int = 0
    total: int = 0
    error: str = ""
    base_model: str = ""
    command: str = ""
    config_text: str = ""
    metrics: list[dict] = field(default_factory=list)

    @property
    def samples(self) -> list[Path]:
        """Validation grids, oldest first."""
        folder = self.path / "samples"
        return sorted(folder.glob("step-*.png")) if folder.is_dir() else []


def read_metrics(run: Path) -> list[dict]:
    """Rows of logs/metrics.csv as floats (a partly written last line is skipped)."""
    path = Path(run) / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in row.items()})
            except (TypeError, ValueError):
                continue
    return rows


def read_config_values(run: Path) -> dict:
    """The resolved config a run wrote (config.toml), or {} before it exists."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = Path(run) / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _job(root: Path, name: str) -> dict:
    try:
        return json.loads((jobs_dir(root) / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _alive(pid: int | None) -> bool:
    """Whether process `pid` is running, on any OS (psutil comes with accelerate).

    A finished child of this process stays as a zombie until reaped; it is not running.
    """
    import psutil

    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        # AccessDenied: the number now belongs to another user's process, so not to a job of this UI.
        return False


def finished_artifact(run: Path) -> Path | None:
    """The `dreamtune.json` of a finished run's artifact, or of an artifact folder itself (a merge's output)."""
    for path in (Path(run) / "artifact" / "dreamtune.json", Path(run) / "dreamtune.json"):
        if path.is_file():
            return path
    return None


def last_error(log: Path) -> str:
    """The one-line error a `dreamtune` command printed, if any."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("dreamtune: "):
            return line[len("dreamtune: "):].removeprefix("error: ")
    for line in reversed(lines):
        if line.strip() and ("Error" in line or "error" in line):
            return line.strip()
    return ""


def run_info(root: Path, name: str) -> RunInfo:
    """Status, progress, config and metrics of one run folder."""
    path = Path(root) / name
    job = _job(root, name)
    values = read_config_values(path)
    metrics = read_metrics(path)
    info = RunInfo(name, path, "empty", method=values.get("method", job.get("method", "")),
                   total=int(values.get("max_train_steps", job.get("total", 0)) or 0),
                   step=int(metrics[-1]["step"]) if metrics else 0,
                   base_model=values.get("pretrained_model_name_or_path", ""),
                   command=job.get("display", ""), metrics=metrics)
    config_path = path / "config.toml"
    info.config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    log = jobs_dir(root) / f"{name}.log"
    if _alive(job.get("pid")):
        info.status = "running" if values else "starting"
    elif finished_artifact(path):
        info.status = "finished"
        info.step = info.total or info.step
        if not info.method:  # an artifact folder without a run around it names its method itself
            try:
                info.method = json.loads(finished_artifact(path).read_text(encoding="utf-8")).get("method", "")
            except (OSError, ValueError):
                pass
    elif job.get("pid") and (job.get("stop_requested") or last_error(log).startswith(STOPPED_LINE)):
        info.status = "stopped"  # by the Stop button, or by Ctrl-C / SIGTERM sent from elsewhere
    elif job.get("pid") and last_error(log):
        info.status, info.error = "failed", last_error(log)
    elif (path / "checkpoints").is_dir() or values:
        info.status = "stopped"
    return info


def list_runs(root: Path) -> list[RunInfo]:
    """Every run folder under `root` (or with a UI job record), newest first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir()
             if p.is_dir() and not p.name.startswith(".") and any((p / m).exists() for m in RUN_MARKERS)}
    if jobs_dir(root).is_dir():
        names |= {p.stem for p in jobs_dir(root).glob("*.json")}
    infos = [run_info(root, n) for n in names]

    def mtime(info: RunInfo) -> float:
        try:
            return info.path.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(infos, key=mtime, reverse=True)


def progress_text(info: RunInfo) -> str:
    """'step 120/400, 3.1 steps/s, 90 s left' from the metrics log."""
    if not info.metrics:
        return f"{info.status}: step 0/{info.total or '?'}"
    last = info.metrics[-1]
    text = f"{info.status}: step {info.step}/{info.total or '?'}, loss {last['loss']:.4f}"
    # wall_time restarts at a resume: measure the speed over the rows since the last restart.
    since = [r for r in info.metrics if r.get("wall_time", 0) <= last.get("wall_time", 0)]
    first = since[0] if since else last
    if last.get("wall_time", 0) > 0 and last["step"] > first["step"] - 1:
        rate = (last["step"] - first["step"] + 1) / max(last["wall_time"], 1e-9)
        text += f", {rate:.2f} steps/s"
        if info.status == "running" and info.total > info.step and rate > 0:
            text += f", about {int((info.total - info.step) / rate)} s left"
    return text


class Jobs:
    """Training jobs as separate `dreamtune train` processes, one at a time.

    A job keeps running when the browser tab closes or the UI stops; its record (command, process
    id) and its output live in `<root>/.dreamtune-ui/jobs/`, so a restarted UI finds it again.
    """

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self._children: dict[str, subprocess.Popen] = {}

    def running(self) -> str | None:
        """The name of the job that is running, if any (started by this UI or an earlier one)."""
        for child in list(self._children.values()):
            child.poll()  # reap finished children
        folder = jobs_dir(self.root)
        if not folder.is_dir():
            return None
        for record in folder.glob("*.json"):
            if _alive(_job(self.root, record.stem).get("pid")):
                return record.stem
        return None

    def start(self, name: str, argv: list[str], *, method: str = "", total: int = 0) -> str:
        """Start `dreamtune train ARGV` for run `name`; refuses while another job runs."""
        busy = self.running()
        if busy:
            raise DreamtuneError(f"a training job is running ({busy}): this UI runs one job at a time, so this one "
                                 "was not started (not queued). Stop that run or wait for it to finish.")
        folder = jobs_dir(self.root)
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / f"{name}.log"
        command = [sys.executable, "-m", "dreamtune.cli", "train", *argv]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log_path.open("w", encoding="utf-8") as log:
            # A new session: a Ctrl-C in the UI's terminal does not reach the training process.
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self._children[name] = child
        write_json(folder / f"{name}.json", {"pid": child.pid, "argv": argv, "display": display_command(argv),
                                             "method": method, "total": total, "started": time.time()})
        return display_command(argv)

    def stop(self, name: str, timeout: float = 0.0) -> bool:
        """Ask the run's process to stop (as Ctrl-C does); True when one was running."""
        record = _job(self.root, name)
        pid = record.get("pid")
        if not _alive(pid):
            return False
        write_json(jobs_dir(self.root) / f"{name}.json", {**record, "stop_requested": True})
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            self.running()
            time.sleep(0.2)
        return True

    def resume(self, name: str) -> str:
        """Continue a stopped run from its newest checkpoint with the command that started it."""
        record = _job(self.root, name)
        run = self.root / name
        if finished_artifact(run):
            raise DreamtuneError(f"run '{name}' has finished: there is nothing to resume.")
        if record.get("argv"):
            argv = _without_resume(record["argv"])
        elif (run / "config.toml").is_file():
            argv = [str(run / "config.toml"), "--no-progress"]
        else:
            raise DreamtuneError(f"run '{name}' has no config.toml yet: start it again from the Train tab.")
        return self.start(name, [*argv, "--resume", "latest"], method=record.get("method", ""),
                          total=record.get("total", 0))

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = jobs_dir(self.root) / f"{name}.log"
        try:
            return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _without_resume(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif a != "--overwrite":
            out.append(a)
    return out


def display_command(argv: list[str]) -> str:
    """The `dreamtune train ...` command line a user can paste into a shell."""
    return shlex.join(["dreamtune", "train", *argv])
