"""Concepts (a subject's images, identifier, class noun and prompts) and rare-token identifiers."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .config import ConceptConfig
from .data.images import list_images, load_images, read_caption
from .errors import ConfigError

logger = logging.getLogger(__name__)

# In CLIP's BPE vocabulary ids follow merge order, which follows frequency in the training text:
# low ids are common words. Identifiers below this id are likely to carry a meaning already.
COMMON_TOKEN_ID_LIMIT = 10_000


@dataclass
class Concept:
    """A concept ready to train: its config, its loaded images and one prompt per image."""

    config: ConceptConfig
    images: list[Image.Image] = field(default_factory=list)
    image_paths: list[Path] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    @property
    def class_prompt(self) -> str:
        return self.config.class_prompt_text


def load_concept(config: ConceptConfig, *, skip_bad_images: bool = False, index: int = 0) -> Concept:
    """Load a concept's images; a caption file beside an image replaces the instance prompt for it.

    Captions may use {identifier} and {class_noun}; they are filled in.
    """
    where = f"concepts[{index}].instance_data_dir"
    if not config.instance_data_dir:
        raise ConfigError(f"{where} is not set: give the folder of the subject's images (--instance-data-dir).")
    if not config.class_noun:
        raise ConfigError(f"concepts[{index}].class_noun is not set: give the subject's class, e.g. --class-noun dog.")
    loaded = load_images(list_images(config.instance_data_dir, what=where), skip_bad_images=skip_bad_images)
    if not loaded:
        raise ConfigError(f"{where}: every image in '{config.instance_data_dir}' was unreadable.")
    prompts = []
    for path, _ in loaded:
        caption = read_caption(path)
        prompts.append(config.format(caption) if caption and "{" in caption else caption or config.prompt)
    return Concept(config, [im for _, im in loaded], [p for p, _ in loaded], prompts)


def token_ids(tokenizer, word: str) -> list[int]:
    """The token ids of a word, without the start and end tokens."""
    return tokenizer(word, add_special_tokens=False).input_ids


def check_identifier(tokenizer, identifier: str) -> list[str]:
    """Warnings for an identifier that is several tokens or a common word (it should be rare)."""
    if not identifier or identifier.startswith("<"):
        return []
    warnings = []
    for word in identifier.split():
        ids = token_ids(tokenizer, word)
        if len(ids) > 1:
            warnings.append(
                f"identifier '{word}' is {len(ids)} tokens in this tokenizer; a single rare token is best (see `dreamtune tokens`)."
            )
        elif ids and ids[0] < COMMON_TOKEN_ID_LIMIT:
            warnings.append(
                f"identifier '{word}' is a common token (id {ids[0]}); the model already has a meaning for it, which "
                "the subject must overwrite. Pick a rare one with `dreamtune tokens`."
            )
    return warnings


def rare_tokens(tokenizer, count: int = 20, *, min_chars: int = 3, max_chars: int = 4) -> list[tuple[str, int]]:
    """Short, rarely used whole-word tokens of a CLIP tokenizer, as the DreamBooth paper recommends.

    Returns (token, id) pairs: lowercase letters only, `min_chars` to `max_chars` long, single tokens,
    from the rare end of the vocabulary, evenly spread over it so the list is not all one prefix.
    """
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []))
    candidates = []
    pattern = re.compile(rf"^[a-z]{{{min_chars},{max_chars}}}</w>$")
    for token, idx in vocab.items():
        if idx < COMMON_TOKEN_ID_LIMIT * 3 or idx in special or not pattern.match(token):
            continue
        word = token[: -len("</w>")]
        if not re.search(r"[aeiou]", word) or token_ids(tokenizer, word) != [idx]:
            continue
        candidates.append((word, idx))
    candidates.sort(key=lambda t: t[1])
    if len(candidates) <= count:
        return candidates
    stride = len(candidates) / count
    return [candidates[int(i * stride)] for i in range(count)]
