"""Textual Inversion (Gal et al., ICLR 2023): learn only the embedding of a new word for the subject.

Each concept's identifier (a new token such as `<my-dog>`) gets `num_vectors` embedding vectors,
named as diffusers names them: `<my-dog>`, `<my-dog>_1`, ... They start from the initializer word's
embedding (`initializer_token`, else the class noun) and are the only thing that trains: the UNet,
the VAE, the rest of the text encoder and every other embedding row stay bit-identical, and the
optimizer holds state for those few rows only (dreamtune.tokens.TrainableTokens).

A prompt names the token once; with several vectors it is expanded to all of them, in training as
diffusers' `maybe_convert_prompt` expands it at inference.

The artifact holds one file per identifier in diffusers' single-key layout `{token: tensor
(num_vectors, width)}`: `learned_embeds.safetensors` for one concept (the name diffusers' own script
writes and `load_textual_inversion(folder)` looks for), `learned_embeds_<name>.safetensors` for each
of several. That layout also loads in AUTOMATIC1111 (as a "diffusers concept"), which names the
embedding after the file. diffusers' loader does not read A1111's `emb_params` layout, hence this one.
On a model with two text encoders (SDXL) the token gets vectors in both, and the file holds
`{"clip_l": ..., "clip_g": ...}`, the layout A1111 and ComfyUI read SDXL embeddings in; each entry
loads with `load_textual_inversion(file["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
tokenizer=pipe.tokenizer_2)` (and `clip_l` with the first encoder).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import ConfigError
from ..tokens import (
    TrainableTokens,
    add_tokens,
    initializers,
    is_new_token,
    load_token_files,
    save_token_file,
)
from .base import Components, Method

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "learned_embeds.safetensors"


def vector_tokens(identifier: str, num_vectors: int) -> list[str]:
    """The tokens holding an identifier's vectors, as diffusers names them: `<t>`, `<t>_1`, ..."""
    return [identifier] + [f"{identifier}_{i}" for i in range(1, num_vectors)]


def embeddings_file(identifier: str, several: bool) -> str:
    """The file an identifier's vectors are saved in (see the module docstring)."""
    if not several:
        return EMBEDDINGS_FILE
    return f"{Path(EMBEDDINGS_FILE).stem}_{re.sub(r'[^A-Za-z0-9._-]', '_', identifier.strip('<>'))}.safetensors"


class ExpandingTokenizer:
    """A tokenizer that first expands each multi-vector token to all its vectors, as diffusers does.

    Installed as `Components.tokenizer` for training so that the loop tokenizes prompts the way a
    pipeline (`maybe_convert_prompt`) does at inference; every other attribute is the tokenizer's.
    """

    def __init__(self, tokenizer, pipe):
        self._tokenizer = tokenizer
        self._pipe = pipe

    def __call__(self, text, *args, **kwargs):
        return self._tokenizer(self._pipe.maybe_convert_prompt(text, self._tokenizer), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class TextualInversion(Method):
    """New token embeddings only; the model itself stays bit-identical."""

    name = "textual_inversion"
    defaults = {**Method.defaults, "learning_rate": 5e-4, "scale_lr": True, "max_train_steps": 2000}
    new_tokens = True

    @dataclass
    class Options:
        """[textual_inversion] (num_vectors was a flat key in earlier versions)."""

        num_vectors: int = opt(1, "Embedding vectors per new token.", min=1)

    def __init__(self, config):
        super().__init__(config)
        self.initializers: dict[str, str] = {}
        self.vectors: dict[str, list[str]] = {}
        #: Trainable rows per text-encoder label (one entry for SD 1.x/2.x, clip_l and clip_g for SDXL).
        self.token_rows: dict[str, TrainableTokens] = {}

    def prepare(self, components: Components, concepts: list) -> list[dict]:
        for module in (components.vae, components.unet, *components.text_encoders):
            module.requires_grad_(False)
        for index, c in enumerate(concepts):
            identifier = c.config.identifier
            if not is_new_token(identifier) or "_" in identifier.rsplit(">", 1)[-1]:
                raise ConfigError(
                    f"concepts[{index}].identifier: '{identifier}' is not a new token; Textual Inversion learns a new "
                    f"word written like <{identifier.strip('<>') or 'new1'}> (set identifier in the concept)."
                )
        self.initializers = initializers(concepts)
        self.tokens = list(self.initializers)
        self.vectors = {t: vector_tokens(t, self.options.num_vectors) for t in self.tokens}
        all_tokens = [v for t in self.tokens for v in self.vectors[t]]
        words = [self.initializers[t] for t in self.tokens for _ in self.vectors[t]]
        # The same new word goes into every text encoder (SDXL: both), each with its own rows.
        for label, tokenizer, encoder in components.encoder_slots():
            ids = add_tokens(tokenizer, encoder, all_tokens, words)
            self.token_rows[label] = TrainableTokens(encoder, ids)
        if self.options.num_vectors > 1:
            components.tokenizers = [ExpandingTokenizer(t, components.pipe) for t in components.tokenizers]
        widths = "+".join(str(rows.weight.shape[1]) for rows in self.token_rows.values())
        logger.info("textual_inversion: training %d vectors of width %s for %s", len(all_tokens), widths, ", ".join(self.tokens))
        # The embeddings are the method's main parameters: they take learning_rate, not text_encoder_lr.
        return self.param_groups([rows.weight for rows in self.token_rows.values()])

    def trains_text_encoder(self, components: Components) -> bool:
        return True

    def embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each identifier's trained vectors per text-encoder label, (num_vectors, width) float32 CPU tensors."""
        out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in self.tokens}
        for label, token_rows in self.token_rows.items():
            rows = token_rows.state()
            ids = iter(token_rows.token_ids)
            for t in self.tokens:
                out[t][label] = torch.stack([rows[next(ids)] for _ in self.vectors[t]])
        return out

    def save_artifact(self, components: Components, folder: Path, meta: dict) -> None:
        from ..artifacts import safetensors_metadata

        several = len(self.tokens) > 1
        files = {t: embeddings_file(t, several) for t in self.tokens}
        meta.update({"num_vectors": self.options.num_vectors, "initializers": self.initializers, "token_files": files})
        header = {**safetensors_metadata(meta), "format": "pt"}
        for token, vectors in self.embeddings().items():
            save_token_file(Path(folder) / files[token], token, vectors, header)

    @classmethod
    def detect(cls, path: Path):
        """`learned_embeds.safetensors` as diffusers' textual_inversion.py writes it (or any one-token file)."""
        from ..artifacts import foreign_artifact, safetensors_keys

        file = path / EMBEDDINGS_FILE if path.is_dir() else path
        keys = safetensors_keys(file) if file.is_file() else None
        if not keys or len(keys) != 1 or not is_new_token(keys[0]):
            return None
        return foreign_artifact(file, cls.name, tokens=keys, token_files={keys[0]: file.name})

    @classmethod
    def apply_artifact(cls, pipe, folder: Path) -> None:
        """Add the artifact's tokens to the pipeline with diffusers' `load_textual_inversion`."""
        from ..artifacts import read_artifact

        info = read_artifact(folder)
        files = info.extra.get("token_files") or {t: EMBEDDINGS_FILE for t in info.tokens}
        load_token_files(pipe, {t: info.path / files[t] for t in info.tokens})
