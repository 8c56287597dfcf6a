"""The training form from the config schema: every option with its default and help, and the command.

The options come from `dreamtune.config.options_help()`, the same rows that `dreamtune train --help`
prints, so the form never holds a hand-copied list. A form's values become `dreamtune train`
arguments (`--set key=value` for what differs from the method's resolved defaults).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# Options the Train tab shows in its main panel; every other option is in the advanced panel.
MAIN_OPTIONS = ("pretrained_model_name_or_path", "method", "output_dir", "max_train_steps", "learning_rate",
                "with_prior_preservation", "resolution", "instance_data_dir", "identifier", "class_noun")
CONCEPT_SECTION = "concept"
_CHOICES_RE = re.compile(r"\s*One of: ([^.]+)\.$")


@dataclass(frozen=True)
class Option:
    """One config option as the form shows it."""

    section: str
    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    #: The value for the first method when the schema's default is "the method's" (None).
    resolved: Any = None

    @property
    def kind(self) -> str:
        """bool, int, float, list, choice or str: which input the form uses."""
        if self.choices:
            return "choice"
        value = self.default if self.default is not None else self.resolved
        for t in (bool, int, float, list):
            if isinstance(value, t):
                return t.__name__
        return "str"

    @property
    def method(self) -> str | None:
        """The method whose own table ([<method>]) holds the option, if any."""
        return self.section[1:-1] if self.section.startswith("[") else None

    @property
    def key(self) -> str:
        """The `--set` key: concept options belong to the first concept, a method's to its table."""
        if self.section == CONCEPT_SECTION:
            return f"concepts.0.{self.name}"
        return f"{self.method}.{self.name}" if self.method else self.name

    @property
    def param(self) -> str:
        """A name unique over all options (a method's options are prefixed with the method)."""
        return f"{self.method}_{self.name}" if self.method else self.name


def options() -> list[Option]:
    """Every option of the config schema, in the order of `dreamtune train --help`."""
    from ..config import load_config, options_help

    first = load_config(None)
    rows = []
    for section, name, default, help_text in options_help():
        choices: tuple[str, ...] = ()
        match = _CHOICES_RE.search(help_text)
        if match:
            choices = tuple(c.strip() for c in match.group(1).split(","))
            help_text = help_text[: match.start()]
        rows.append(Option(section, name, default, help_text, choices, getattr(first, name, None)))
    return rows


def advanced_options() -> list[Option]:
    return [o for o in options() if o.name not in MAIN_OPTIONS]


def method_defaults(method: str) -> dict[str, Any]:
    """Each option's value for `method` when the user sets nothing (method defaults applied)."""
    from ..config import load_config

    config = load_config(None, method=method)
    values = {}
    for o in options():
        if o.section == CONCEPT_SECTION:
            values[o.param] = o.default
        elif o.method:
            values[o.param] = getattr(config.method_options, o.name) if o.method == method else o.default
        else:
            values[o.param] = getattr(config, o.name)
    return values


def to_text(value: Any) -> str:
    """An option value as `--set` writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def parse_value(option: Option, value: Any) -> Any:
    """A form field's value in the option's type (numbers arrive as floats, lists as text)."""
    if option.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if option.kind == "list" and isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        return json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
    return value


def train_argv(main: dict[str, Any], advanced: dict[str, Any], *, method: str) -> list[str]:
    """`dreamtune train` arguments for the form's values.

    The main options are always written out; an advanced option only when it differs from the
    method's resolved default, so the command stays short and says what was chosen.
    """
    by_param = {o.param: o for o in options()}
    argv: list[str] = []
    for name in MAIN_OPTIONS:
        if name in main and main[name] is not None:
            option = by_param[name]
            argv += ["--set", f"{option.key}={to_text(parse_value(option, main[name]))}"]
    defaults = method_defaults(method)
    for param, value in advanced.items():
        option = by_param[param]
        value = parse_value(option, value)
        # Another method's own options do not apply to this run.
        if value is None or value == defaults.get(param) or option.method not in (None, method):
            continue
        argv += ["--set", f"{option.key}={to_text(value)}"]
    return argv + ["--no-progress"]
