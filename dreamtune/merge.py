"""Custom Diffusion's closed-form merge: several concepts' K/V weights combined into one set.

For every cross-attention key and value weight the merge solves

    min_W ||C_reg W^T - C_reg W0^T||_F   subject to   C W^T = V

where W0 is the base weight, C_reg the text features (the text encoder's outputs, one row per token
after the start token up to the end token) of about 200 regularisation captions, C the features of
each concept's prompts "<new_i> class", "a photo of <new_i> class" and the prompt it was trained on
(recorded in its dreamtune.json, e.g. "a photo of a <new_i> class") from its modifier token up to the
end token, and V = C_i W_i^T what each fine-tuned weight W_i makes of its own concept's rows. The
words before the modifier token are the same for every concept and stay under the regularisation
term only, as in the reference code; but the text encoder is causal, so the modifier token's features
depend on them, and the training prompt's own rows are the ones its prompts at inference share. With M = C_reg^T C_reg the solution is

    W^T = W0^T + M^{-1} C^T (C M^{-1} C^T)^{-1} (V - C W0^T)

computed in float64 with a Cholesky factorisation of M (plus a tiny ridge, for directions no caption
covers) and a solve with C M^{-1} C^T (no explicit inverse). Duplicate constraint rows are dropped; rows that cannot all hold are an error.

Command line: `dreamtune merge RUN_A RUN_B ... --reg-captions FILE --out MERGED [--base BASE]`.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DreamtuneError

logger = logging.getLogger(__name__)

DEFAULT_NUM_REG_CAPTIONS = 200
CONCEPT_PROMPTS = ("{identifier} {class_noun}", "a photo of {identifier} {class_noun}")


class MergeError(DreamtuneError):
    """Artifacts that cannot be merged, or constraints that cannot all hold."""


@dataclass
class MergeResult:
    """What `merge` returns: the merged artifact, its tokens and per-layer figures."""

    out_dir: Path
    tokens: list[str]
    constraint_rows: int
    max_constraint_error: float
    layers: dict[str, dict] = field(default_factory=dict)


def solve_constrained(w0: torch.Tensor, c_reg: torch.Tensor, c: torch.Tensor, v: torch.Tensor, *,
                      ridge: float = 1e-8, rank_tol: float = 1e-6, consistency_tol: float = 1e-6) -> torch.Tensor:
    """The W closest to `w0` on `c_reg`'s rows (least squares) with `c @ W.T == v` exactly.

    Shapes: w0 (out, d), c_reg (n, d), c (m, d), v (m, out). Computed in float64; returns float64.
    A ridge of `ridge` times the mean eigenvalue of C_reg^T C_reg keeps directions that the captions
    do not cover (text features after a LayerNorm all lie in a subspace) at the base weight instead
    of amplifying rounding noise there. When the rows of C are linearly dependent the targets must
    agree with that dependence (else MergeError).
    """
    w0, c_reg, c, v = (t.double() for t in (w0, c_reg, c, v))
    d = w0.shape[1]
    gram = c_reg.T @ c_reg
    scale = float(torch.trace(gram)) / d
    if scale <= 0:
        raise MergeError("the regularisation captions give all-zero text features; check the captions and base model.")
    chol = torch.linalg.cholesky(gram + ridge * scale * torch.eye(d, dtype=gram.dtype))
    residual = v - c @ w0.T  # (m, out): what the constraints ask beyond the base weight
    m_inv_ct = torch.cholesky_solve(c.T, chol)  # (d, m) = M^-1 C^T
    schur = c @ m_inv_ct  # (m, m) = C M^-1 C^T
    s = torch.linalg.svdvals(c)
    rank = int((s > rank_tol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    if rank == c.shape[0]:
        y = torch.linalg.solve(schur, residual)
    else:
        y = torch.linalg.lstsq(schur, residual, rcond=rank_tol, driver="gelsd").solution
    w = w0 + (m_inv_ct @ y).T
    error = torch.linalg.matrix_norm(c @ w.T - v) / torch.linalg.matrix_norm(v).clamp(min=1e-300)
    if error > consistency_tol:
        raise MergeError(
            f"the concepts' constraints cannot all hold (relative error {error:.2e}): {c.shape[0]} constraint rows "
            f"are only of rank {rank} and ask for different outputs. Merge fewer concepts, or concepts whose "
            "prompts differ more.")
    return w


def feature_rank(features: torch.Tensor, tol: float = 1e-6) -> int:
    """How many directions a set of text-feature rows spans (singular values above `tol` of the largest)."""
    s = torch.linalg.svdvals(features.double())
    return int((s > tol * s.max()).sum()) if s.numel() and s.max() > 0 else 0


def dedupe_rows(c: torch.Tensor, v: torch.Tensor, *, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop constraint rows of `c` that repeat an earlier row; a repeat with another target is an error."""
    keep: list[int] = []
    scale = c.abs().max().clamp(min=1e-30)
    vscale = v.abs().max().clamp(min=1e-30)
    for i in range(c.shape[0]):
        for j in keep:
            if (c[i] - c[j]).abs().max() <= tol * scale:
                if (v[i] - v[j]).abs().max() > 1e-5 * vscale:
                    raise MergeError(
                        "two concepts give the same text features different targets (the same prompt in two "
                        "artifacts?); each concept needs its own modifier token.")
                break
        else:
            keep.append(i)
    return c[keep], v[keep]


def read_captions(reg_captions: str | os.PathLike | Sequence[str], limit: int = DEFAULT_NUM_REG_CAPTIONS) -> list[str]:
    """The first `limit` non-empty lines of a caption file (or a list of captions)."""
    if isinstance(reg_captions, (str, os.PathLike)):
        path = Path(reg_captions).expanduser()
        if not path.is_file():
            raise MergeError(f"--reg-captions '{path}': no such file. Give a text file with one caption per line "
                             "(e.g. the captions.txt that `dreamtune retrieve` writes).")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    else:
        lines = list(reg_captions)
    captions = [line.strip() for line in lines if line.strip()][:limit]
    if not captions:
        raise MergeError(f"--reg-captions: no captions in {reg_captions!r}.")
    return captions


@torch.no_grad()
def token_features(pipe, prompt: str, start: int = 1) -> torch.Tensor:
    """Cross-attention inputs (float64) of a prompt's tokens from position `start` through the end token.

    They are what the family feeds the UNet's cross-attention (SDXL: both encoders' states side by side).
    """
    from .families import encoder_slots, family_of

    slots = encoder_slots(pipe)
    ids = [tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids for _, tok, _ in slots]
    device = next(slots[0][2].parameters()).device
    hidden = family_of(pipe).encode([torch.tensor([i], device=device) for i in ids], [e for _, _, e in slots]).embeds[0]
    return hidden[start : len(ids[0])].double().cpu()


def concept_features(pipe, identifier: str, class_noun: str, prompts: Sequence[str] = ()) -> torch.Tensor:
    """Constraint rows of one concept: its prompts' features from the identifier through the end token.

    The prompts are CONCEPT_PROMPTS and `prompts` (those it was trained on; one without the identifier, or
    empty, is skipped), each once.
    """
    tok = pipe.tokenizer
    ident_ids = tok(identifier, add_special_tokens=False).input_ids
    rows = []
    texts = [t.format(identifier=identifier, class_noun=class_noun).strip() for t in CONCEPT_PROMPTS]
    for prompt in dict.fromkeys([*texts, *(p.strip() for p in prompts if identifier in p)]):
        ids = tok(prompt).input_ids
        start = next((i for i in range(len(ids)) if ids[i : i + len(ident_ids)] == ident_ids), 1)
        rows.append(token_features(pipe, prompt, start))
    return torch.cat(rows)


def _load_weights(info, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An artifact's K/V weights by UNet parameter name (full weights, also from a compressed artifact)."""
    from safetensors.torch import load_file

    from .methods.custom_diffusion import LORA_WEIGHT_NAME, WEIGHT_NAME, weights_from_diffusers

    if (info.path / WEIGHT_NAME).is_file():
        weights = weights_from_diffusers(load_file(info.path / WEIGHT_NAME))
    elif (info.path / LORA_WEIGHT_NAME).is_file():
        state = load_file(info.path / LORA_WEIGHT_NAME)
        weights = {}
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                module = key[len("unet.") : -len(".lora_A.weight")]
                up = state[key.replace(".lora_A.", ".lora_B.")]
                name = f"{module}.weight"
                weights[name] = (base_weights[name].double() + up.double() @ down.double()).float()
    else:
        raise MergeError(f"{info.path}: no Custom Diffusion weights in this artifact.")
    extra = sorted(n for n in weights if n not in base_weights)
    if extra:
        raise MergeError(
            f"{info.path}: trains {extra[0].rsplit('.', 2)[-2]} as well (train_params = 'crossattn'); the closed-form "
            "merge combines key/value weights only. Merge artifacts trained with train_params = 'crossattn_kv'.")
    return weights


def merge(artifacts: Sequence[str | os.PathLike], reg_captions: str | os.PathLike | Sequence[str],
          out_dir: str | os.PathLike, base: str | None = None, *,
          num_reg_captions: int = DEFAULT_NUM_REG_CAPTIONS) -> MergeResult:
    """Merge Custom Diffusion artifacts (runs or artifact folders) into one artifact at `out_dir`.

    `reg_captions` is a text file with one caption per line (or a list); the first
    `num_reg_captions` are used. `base` defaults to the artifacts' base model (they must agree).
    The merged artifact holds every concept's modifier token and loads like a trained one. Raises
    MergeError when artifacts are not Custom Diffusion K/V artifacts, share a modifier token, or
    when the constraints cannot all hold.
    """
    from .artifacts import metadata, read_artifact, safetensors_metadata, write_metadata
    from .families import encoder_slots
    from .io import atomic_dir, save_safetensors, write_text
    from .methods.custom_diffusion import (
        WEIGHT_NAME,
        CustomDiffusion,
        cross_attention_layers,
        diffusers_state_dict,
        save_token_files,
        token_files,
    )
    from .pipeline import load_base
    from .tokens import load_token_files

    if len(artifacts) < 1:
        raise MergeError("merge: give at least one artifact (two or more to combine concepts).")
    infos = [read_artifact(a) for a in artifacts]
    for info in infos:
        if info.method != CustomDiffusion.name:
            raise MergeError(f"{info.path}: a '{info.method}' artifact; only Custom Diffusion artifacts can be merged.")
    if base is None:
        bases = {info.base_model for info in infos}
        if len(bases) != 1 or not next(iter(bases)):
            raise MergeError(f"the artifacts were trained on different base models ({', '.join(sorted(bases))}); "
                             "give the one to merge on with --base.")
        base = next(iter(bases))
    owners: dict[str, int] = {}
    concepts: list[tuple[int, dict]] = []  # (artifact index, its dreamtune.json concept entry)
    for i, info in enumerate(infos):
        listed = info.extra.get("concepts") or []
        if not listed:
            raise MergeError(f"{info.path}: dreamtune.json lists no concepts (identifier and class noun).")
        for c in listed:
            token = c["identifier"]
            if token in owners and owners[token] != i:
                raise MergeError(
                    f"{infos[owners[token]].path} and {info.path} both use the modifier token {token}; retrain one "
                    "with another identifier (e.g. <new2>) before merging.")
            owners[token] = i
            concepts.append((i, c))
    out_dir = Path(out_dir).expanduser()
    captions = read_captions(reg_captions, num_reg_captions)

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    for info in infos:
        load_token_files(pipe, token_files(info))
    unet = pipe.unet
    names = [f"{layer}.{proj}.weight" for layer in cross_attention_layers(unet) for proj in ("to_k", "to_v")]
    base_weights = {n: unet.get_parameter(n).detach().float().cpu() for n in names}
    tuned = [_load_weights(info, base_weights) for info in infos]
    for info, weights in zip(infos, tuned):
        missing = [n for n in names if n not in weights]
        if missing:
            raise MergeError(f"{info.path}: has no weight for {missing[0]}; was it trained on another base model?")

    c_reg = torch.cat([token_features(pipe, caption) for caption in captions])
    covered = feature_rank(c_reg)
    if covered < c_reg.shape[1] - 1:
        # A LayerNorm without bias leaves one direction out by construction; more missing means too few captions.
        logger.warning("the %d regularisation captions span %d of %d text-feature directions; the weights are held "
                       "near the base only there. About 200 varied captions are recommended.",
                       len(captions), covered, c_reg.shape[1])
    features = [concept_features(pipe, c["identifier"], c["class_noun"], [c.get("instance_prompt", "")])
                for _, c in concepts]
    merged, layers = {}, {}
    for name in names:
        c = torch.cat(features)
        v = torch.cat([f @ tuned[i][name].double().T for f, (i, _) in zip(features, concepts)])
        c, v = dedupe_rows(c, v)
        w = solve_constrained(base_weights[name], c_reg, c, v)
        error = float(torch.linalg.matrix_norm(c @ w.T - v) / torch.linalg.matrix_norm(v).clamp(min=1e-300))
        merged[name] = w.float()
        layers[name] = {"constraint_rows": c.shape[0], "relative_constraint_error": error,
                        "regularisation_change": float(torch.linalg.matrix_norm(c_reg @ (w - base_weights[name].double()).T)
                                                       / torch.linalg.matrix_norm(c_reg @ base_weights[name].double().T))}
    tokens = [t for info in infos for t in info.tokens]
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for token in tokens:
        embeddings[token] = {label: encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(token)].detach().float().cpu().clone()
                             for label, tok, encoder in encoder_slots(pipe)}
    result = MergeResult(out_dir, tokens, max(r["constraint_rows"] for r in layers.values()),
                         max(r["relative_constraint_error"] for r in layers.values()), layers)
    meta = metadata(CustomDiffusion.name, base, tokens,
                    concepts=[c for _, c in concepts],
                    train_params="crossattn_kv", weight_file=WEIGHT_NAME,
                    token_files={t: f"{t}.safetensors" for t in tokens},
                    merge={"sources": [str(info.path.resolve()) for info in infos], "num_reg_captions": len(captions),
                           "constraint_rows": result.constraint_rows,
                           "max_relative_constraint_error": result.max_constraint_error})
    with atomic_dir(out_dir) as tmp:
        save_safetensors(diffusers_state_dict(unet, merged), tmp / WEIGHT_NAME,
                         safetensors_metadata({**meta, "format": "pt"}))
        save_token_files(embeddings, tmp)
        write_text(tmp / "reg_captions.txt", "\n".join(captions) + "\n")
        write_metadata(tmp, meta)
    logger.info("merged %d concepts (%s) into %s; constraint rows %d, worst relative constraint error %.2e",
                len(concepts), ", ".join(c["identifier"] for _, c in concepts), out_dir, result.constraint_rows,
                result.max_constraint_error)
    return result


# --- command line ---------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add `dreamtune merge` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "merge", help="merge Custom Diffusion runs into one model (closed-form constrained merge)",
        description="Combine several Custom Diffusion concepts into one set of cross-attention K/V weights: the "
                    "weights stay as close to the base as the regularisation captions can tell, while each "
                    "concept's prompts give exactly what its own run gave.")
    p.add_argument("artifacts", nargs="+", metavar="RUN", help="Custom Diffusion run folders or artifact folders")
    p.add_argument("--reg-captions", required=True, metavar="FILE",
                   help="text file, one caption per line (e.g. the captions.txt of `dreamtune retrieve`)")
    p.add_argument("--num-reg-captions", type=int, default=DEFAULT_NUM_REG_CAPTIONS, metavar="N",
                   help=f"use the first N captions (default {DEFAULT_NUM_REG_CAPTIONS})")
    p.add_argument("--out", required=True, metavar="MERGED", help="folder of the merged artifact")
    p.add_argument("--base", help="base model (default: the one the runs were trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    """Handler of `dreamtune merge`."""
    from .io import require_empty

    out = require_empty(args.out, overwrite=args.overwrite)
    result = merge(args.artifacts, args.reg_captions, out, base=args.base, num_reg_captions=args.num_reg_captions)
    print(f"merged {len(args.artifacts)} runs into {result.out_dir} (tokens: {', '.join(result.tokens) or 'none'}; "
          f"{result.constraint_rows} constraint rows, worst relative error {result.max_constraint_error:.1e})")
    return 0


class _CallableModule(types.ModuleType):
    """Calling this module merges: `dreamtune.merge` names both the module and its function.

    The package exports the function lazily, but importing the submodule (the CLI does) rebinds
    `dreamtune.merge` to the module; either way `dreamtune.merge(...)` then works.
    """

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
