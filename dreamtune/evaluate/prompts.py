"""Evaluation prompts: the built-in DreamBench-style list, prompt files, and the DreamBench dataset layout.

The built-in list follows DreamBench's protocol (25 prompts per subject; objects: 20
recontextualisations + 5 property changes; live subjects: 10 recontextualisations + 10
accessorisations + 5 property changes) with prompts of our own. To score on DreamBench itself,
point `dreamtune bench` (or `--prompts`) at the google/dreambooth dataset: its
`prompts_and_classes.txt` is read as it is.

Templates use `{identifier}` and `{class_noun}` (`{class}`, `{0}` and `{1}` are accepted too).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreamtuneError

RECONTEXTUALIZATION = (
    "a {identifier} {class_noun} on a wooden kitchen table",
    "a {identifier} {class_noun} in a field of lavender",
    "a {identifier} {class_noun} on a rocky shore at sunset",
    "a {identifier} {class_noun} on a desert sand dune",
    "a {identifier} {class_noun} in a snowy pine forest",
    "a {identifier} {class_noun} on a library bookshelf",
    "a {identifier} {class_noun} on a subway platform",
    "a {identifier} {class_noun} next to a campfire at night",
    "a {identifier} {class_noun} on a stone bridge over a river",
    "a {identifier} {class_noun} in a greenhouse full of plants",
    "a {identifier} {class_noun} on a checkered picnic blanket",
    "a {identifier} {class_noun} with a lighthouse in the background",
    "a {identifier} {class_noun} on a marble countertop",
    "a {identifier} {class_noun} in a puddle after the rain",
    "a {identifier} {class_noun} on the roof of a yellow taxi",
    "a {identifier} {class_noun} with neon signs in the background",
    "a {identifier} {class_noun} on a mossy log in the woods",
    "a {identifier} {class_noun} in front of a red brick wall",
    "a {identifier} {class_noun} on a frozen lake",
    "a {identifier} {class_noun} with hot air balloons in the sky behind it",
)
ACCESSORIZATION = (
    "a {identifier} {class_noun} wearing a knitted beanie",
    "a {identifier} {class_noun} wearing a bow tie",
    "a {identifier} {class_noun} wearing round sunglasses",
    "a {identifier} {class_noun} wearing a yellow raincoat",
    "a {identifier} {class_noun} wearing a golden crown",
    "a {identifier} {class_noun} in an astronaut suit",
    "a {identifier} {class_noun} in a pirate costume",
    "a {identifier} {class_noun} wearing a flower garland",
    "a {identifier} {class_noun} wearing headphones",
    "a {identifier} {class_noun} in a suit of armour",
)
PROPERTY = (
    "a green {identifier} {class_noun}",
    "a golden {identifier} {class_noun}",
    "a {identifier} {class_noun} made of glass",
    "a {identifier} {class_noun} made of wood",
    "a striped {identifier} {class_noun}",
)
#: Classes counted as live subjects (they get accessorisation prompts). DreamBench's live subjects are its dogs and cats.
LIVE_CLASSES = frozenset({"dog", "cat", "puppy", "kitten"})
PROMPT_FILE_NAME = "prompts_and_classes.txt"


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt template and its DreamBench category."""

    template: str
    kind: str = "prompt"

    def fill(self, identifier: str, class_noun: str) -> str:
        """The prompt with the identifier and class noun put in."""
        return fill_template(self.template, identifier, class_noun)


def fill_template(template: str, identifier: str, class_noun: str) -> str:
    """Put `identifier` and `class_noun` into a template ({identifier}/{class_noun}, {class}, {0}/{1})."""
    text = template.replace("{class}", "{class_noun}").replace("{0}", "{identifier}").replace("{1}", "{class_noun}")
    return text.replace("{identifier}", identifier).replace("{class_noun}", class_noun)


def is_live(class_noun: str) -> bool:
    """Whether a class counts as a live subject (dogs and cats, as in DreamBench)."""
    return class_noun.strip().lower() in LIVE_CLASSES


def _kinds(n: int, live: bool) -> list[str]:
    # DreamBench's lists keep this order; a list of another length is not labelled.
    if n != 25:
        return ["prompt"] * n
    if live:
        return ["recontextualization"] * 10 + ["accessorization"] * 10 + ["property"] * 5
    return ["recontextualization"] * 20 + ["property"] * 5


def builtin_prompts(live: bool) -> list[EvalPrompt]:
    """The built-in 25 DreamBench-style prompts for a live subject or an object."""
    templates = (RECONTEXTUALIZATION[:10] + ACCESSORIZATION if live else RECONTEXTUALIZATION) + PROPERTY
    return [EvalPrompt(t, k) for t, k in zip(templates, _kinds(len(templates), live))]


@dataclass
class DreamBenchFile:
    """What a `prompts_and_classes.txt` holds: subject -> class, and the object and live prompt lists."""

    classes: dict[str, str] = field(default_factory=dict)
    object_prompts: list[EvalPrompt] = field(default_factory=list)
    live_prompts: list[EvalPrompt] = field(default_factory=list)

    def prompts_for(self, live: bool) -> list[EvalPrompt]:
        """The live-subject or the object list."""
        return self.live_prompts if live else self.object_prompts


def parse_dreambench_file(path: str | Path) -> DreamBenchFile:
    """Read google/dreambooth's `prompts_and_classes.txt` (its Classes CSV and its two prompt lists)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DreamtuneError(f"{path}: cannot read the prompt file ({e}).") from None
    result = DreamBenchFile()
    section = None
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if not line:
            continue
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in line and low != "subject_name,class":
            subject, class_noun = line.split(",", 1)
            result.classes[subject.strip()] = class_noun.strip()
        elif section in prompts:
            match = re.match(r"""^(['"])(.*)\1\s*(\.format\(.*\))?\s*,?$""", line)
            if match:
                prompts[section].append(ast.literal_eval(match.group(1) + match.group(2) + match.group(1)))
    if not result.classes and not prompts["object"] and not prompts["live"]:
        raise DreamtuneError(f"{path}: no classes or prompt lists found; expected google/dreambooth's {PROMPT_FILE_NAME} layout.")
    result.object_prompts = [EvalPrompt(t, k) for t, k in zip(prompts["object"], _kinds(len(prompts["object"]), False))]
    result.live_prompts = [EvalPrompt(t, k) for t, k in zip(prompts["live"], _kinds(len(prompts["live"]), True))]
    return result


def read_prompt_file(path: str | Path, *, live: bool = False) -> list[EvalPrompt]:
    """Prompts from a file: a DreamBench `prompts_and_classes.txt`, or one template per line ('#' comments)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DreamtuneError(f"--prompts: '{path}' is not a file. Use 'dreambench' for the built-in list or a file with one prompt per line.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if "prompt_list" in text or re.search(r"^\s*Object Prompts\s*$", text, re.MULTILINE):
        prompts = parse_dreambench_file(path).prompts_for(live)
    else:
        prompts = [EvalPrompt(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DreamtuneError(f"--prompts: '{path}' holds no prompts.")
    return prompts


def resolve_prompts(source: str | Path | list, *, live: bool) -> list[EvalPrompt]:
    """'dreambench' (the built-in list), a prompt file, or a list of templates -> EvalPrompts."""
    if isinstance(source, (list, tuple)):
        return [p if isinstance(p, EvalPrompt) else EvalPrompt(str(p)) for p in source]
    if str(source).lower() == "dreambench":
        return builtin_prompts(live)
    return read_prompt_file(source, live=live)
