"""New tokens for a text encoder: add them, initialise them, and train only their embedding rows.

Custom Diffusion's modifier tokens (`<new1>`) and Textual Inversion's placeholder tokens are new
words: each gets a vocabulary entry and an embedding row copied from a one-token initializer word.
`add_tokens` does that. `TrainableTokens` then trains those rows alone: the embedding matrix stays
frozen (bit-identical, no gradient, no optimizer state for 49,408 rows) and a small parameter holding
the new rows is spliced into the embedding's output wherever a new token's id appears.

Tokens are added the way diffusers' `load_textual_inversion` adds them (`tokenizer.add_tokens(token)`),
so a prompt tokenizes the same in training and in a pipeline loaded with diffusers' own loader.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ConfigError, ModelLoadError, first_line

# A new token is written <name>: no spaces (the tokenizer would split it) and no path characters,
# because diffusers' convention names the embedding file after the token. A multi-vector token's
# extra vectors are <name>_1, <name>_2, ... as diffusers' load_textual_inversion names them.
NEW_TOKEN_RE = re.compile(r"^<[^<>\s/\\]+>(_\d+)?$")
# In CLIP's BPE vocabulary ids follow merge order, which follows frequency in the training text:
# low ids are common words. Identifiers below this id are likely to carry a meaning already.
COMMON_TOKEN_ID_LIMIT = 10_000


def is_new_token(identifier: str) -> bool:
    """True when an identifier is written as a new token, like `<new1>` (not an existing word)."""
    return bool(NEW_TOKEN_RE.match(identifier or ""))


def single_token_id(tokenizer, word: str, *, what: str = "initializer_token") -> int:
    """The id of a word that the tokenizer keeps as one token; a ConfigError names `what` otherwise."""
    ids = tokenizer(word, add_special_tokens=False).input_ids if word else []
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids) if ids else []
        raise ConfigError(
            f"{what}: '{word}' is {len(ids)} tokens ({' '.join(pieces) or 'empty'}) in this tokenizer; it must be a "
            "single-token word such as 'dog' or 'toy'. Set initializer_token in the concept to one."
        )
    return ids[0]


def initializers(concepts, *, where: str = "concepts") -> dict[str, str]:
    """Each concept's identifier -> its initializer word (`initializer_token`, else the class noun), in order.

    A ConfigError when two concepts share an identifier but not its initializer.
    """
    found: dict[str, str] = {}
    for c in concepts:
        identifier, initializer = c.config.identifier, c.config.initializer_token or c.config.class_noun
        if found.setdefault(identifier, initializer) != initializer:
            raise ConfigError(
                f"{where}: '{identifier}' is used by two concepts with different initializers "
                f"('{found[identifier]}', '{initializer}'); give each concept its own token.")
    return found


def read_embedding_file(path: Path) -> dict[str, torch.Tensor]:
    """The `{token: rows}` of an embedding file in safetensors form, whatever its suffix.

    diffusers' Custom Diffusion script writes safetensors content under the name `<token>.bin`.
    Pickled files are refused: loading one can run code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: not a safetensors file ({first_line(e)}); dreamtune loads embeddings only from "
                             "safetensors (re-save the pickled file with safetensors.torch.save_file).") from None


def load_token_files(pipe, files: dict[str, Path]) -> None:
    """Add each token to a pipeline from its embedding file with diffusers' `load_textual_inversion`.

    With several text encoders (SDXL) the file holds one entry per encoder label (`clip_l`, `clip_g`)
    and each goes into its own encoder and tokenizer.
    """
    from .families import encoder_slots

    slots = encoder_slots(pipe)
    vocab = set().union(*(tok.get_vocab() for _, tok, _ in slots))
    for token, path in files.items():
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing; the artifact lists the token {token} but has no embedding file for it.")
        if token in vocab:
            raise ModelLoadError(
                f"{path.parent}: the token {token} is already in the pipeline's tokenizer (another artifact added it); "
                "artifacts loaded together need different tokens.")
        state = read_embedding_file(path)
        if len(slots) == 1:
            pipe.load_textual_inversion(state, token=token)
            continue
        missing = [label for label, _, _ in slots if label not in state]
        if missing:
            raise ModelLoadError(f"{path}: has no '{missing[0]}' entry; an embedding for this model needs one per text "
                                 f"encoder ({', '.join(label for label, _, _ in slots)}).")
        for label, tokenizer, encoder in slots:
            pipe.load_textual_inversion(state[label], token=token, text_encoder=encoder, tokenizer=tokenizer)


def add_tokens(tokenizer, text_encoder, tokens: Sequence[str], initializer_words: Sequence[str] | str) -> list[int]:
    """Add new tokens to a tokenizer and text encoder; each row starts as its initializer word's row.

    `initializer_words` is one word per token, or one word for all. Raises ConfigError when a token
    is already in the vocabulary (an existing word, or added twice), is not written like `<name>`,
    or when an initializer word is not a single token. The embedding matrix grows to hold the new
    rows; every existing row is copied bit for bit. Returns the new tokens' ids, in order.
    """
    tokens = list(tokens)
    words = [initializer_words] * len(tokens) if isinstance(initializer_words, str) else list(initializer_words)
    if len(words) != len(tokens):
        raise ValueError(f"add_tokens: {len(tokens)} tokens but {len(words)} initializer words")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"identifier: the new tokens {tokens} contain duplicates; give each concept its own token.")
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not is_new_token(token):
            raise ConfigError(f"identifier: '{token}' is not a new token; write it as <name>, e.g. <new1>.")
        if token in vocab:
            raise ConfigError(
                f"identifier: '{token}' is already in the tokenizer's vocabulary (id {vocab[token]}); choose another "
                "new token, e.g. <new2>."
            )
    init_ids = [single_token_id(tokenizer, w, what=f"initializer for {t}") for t, w in zip(tokens, words)]
    for token in tokens:
        tokenizer.add_tokens(token)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for token, token_id in zip(tokens, ids):
        if tokenizer(token, add_special_tokens=False).input_ids != [token_id]:
            raise ConfigError(f"identifier: the tokenizer does not keep '{token}' whole; choose a simpler name like <new1>.")
    embedding = text_encoder.get_input_embeddings()
    rows = max(embedding.weight.shape[0], len(tokenizer))
    if rows != embedding.weight.shape[0]:
        # mean_resizing would draw random rows from the global generator (and costs a covariance);
        # the rows are overwritten just below anyway.
        text_encoder.resize_token_embeddings(rows, mean_resizing=False)
        embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for token_id, init_id in zip(ids, init_ids):
            embedding.weight[token_id] = embedding.weight[init_id]
    return list(ids)


class TrainableTokens:
    """Trainable embedding rows for some token ids, with the text encoder's embedding matrix frozen.

    The rows live in one small float32 parameter (`weight`, tokens x width) registered on the
    embedding module as `added_rows`, so it moves with `.to(device)`, is found by
    `named_parameters()` (checkpoints, distributed training) and is the only text-encoder tensor that
    gets a gradient. A forward hook puts the rows into the embedding's output where the ids occur.
    `write_back()` copies the rows into the matrix and removes the parameter and the hook.
    Only the matrix is frozen here; the caller freezes the rest of the text encoder.
    """

    PARAM_NAME = "added_rows"

    def __init__(self, text_encoder, token_ids: Sequence[int]):
        self.text_encoder = text_encoder
        self.token_ids = list(token_ids)
        self.embedding = text_encoder.get_input_embeddings()
        if hasattr(self.embedding, self.PARAM_NAME):
            raise RuntimeError("the text encoder already has trainable token rows attached")
        matrix = self.embedding.weight
        matrix.requires_grad_(False)
        ids = torch.tensor(self.token_ids, dtype=torch.long)
        self.weight = torch.nn.Parameter(matrix.detach()[ids.to(matrix.device)].clone().float())
        self.embedding.register_parameter(self.PARAM_NAME, self.weight)
        # Row of each vocabulary id in `weight`, -1 for ids that are not trained.
        lookup = torch.full((matrix.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.embedding.register_buffer("added_rows_lookup", lookup.to(matrix.device), persistent=False)
        self._hook = self.embedding.register_forward_hook(self._splice)

    @staticmethod
    def _splice(module, args, output):
        input_ids = args[0] if args else None
        if input_ids is None:
            return output
        slot = module.added_rows_lookup[input_ids]
        rows = module.added_rows[slot.clamp(min=0)].to(output.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, output)

    def state(self) -> dict[int, torch.Tensor]:
        """The current rows by token id (float32 CPU copies)."""
        return {i: row.detach().float().cpu().clone() for i, row in zip(self.token_ids, self.weight)}

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained rows into the embedding matrix and detach the parameter and hook."""
        matrix = self.embedding.weight
        for token_id, row in zip(self.token_ids, self.weight):
            matrix[token_id] = row.to(matrix.dtype)
        self.detach()

    def detach(self) -> None:
        """Remove the parameter and the hook without touching the matrix (the rows revert)."""
        self._hook.remove()
        self.embedding._parameters.pop(self.PARAM_NAME, None)
        self.embedding._buffers.pop("added_rows_lookup", None)


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


def save_token_file(path, token: str, rows: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one new token's trained rows, keyed by text-encoder label ({label: rows}).

    With one text encoder the file is diffusers' single-key layout `{token: rows}`; with several it
    holds one entry per encoder label (`clip_l`, `clip_g` for SDXL), the layout AUTOMATIC1111 and
    ComfyUI read SDXL embeddings in.
    """
    from .io import save_safetensors

    tensors = {token: next(iter(rows.values()))} if len(rows) == 1 else dict(rows)
    save_safetensors({k: v.float().contiguous() for k, v in tensors.items()}, path, metadata or {"format": "pt"})
