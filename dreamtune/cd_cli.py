"""Custom Diffusion's commands: `dreamtune merge` and `dreamtune retrieve`."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `merge` and `retrieve` subcommands (each sets func=handler(args) -> int)."""
    from . import merge
    from .data import retrieval

    merge.register(subparsers)
    retrieval.register(subparsers)
