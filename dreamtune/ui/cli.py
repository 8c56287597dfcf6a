"""The `dreamtune ui` command."""

from __future__ import annotations

import logging

from ..errors import DreamtuneError

logger = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    """Add the `ui` subcommand."""
    p = subparsers.add_parser(
        "ui", help="start the web UI (train, sample, compare, runs) in the browser",
        description="Serve the web UI. It listens on 127.0.0.1 only unless --host says otherwise; from another "
        "machine, reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 HOST) rather than opening the port.")
    p.add_argument("--root", default="runs", help="folder of the run folders (default ./runs)")
    p.add_argument("--base", default=None, help="default base model (default: the shipped shapes-world model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DreamtuneError("`dreamtune ui` needs gradio: pip install 'dreamtune[ui]' (in a clone: "
                             "pip install -c constraints.txt -e '.[ui]').") from None
    from .app import launch

    if args.host not in LOCAL_HOSTS:
        logger.warning("the UI listens on %s: anyone who can reach this address can train and read your runs. "
                       "An SSH tunnel to 127.0.0.1 is safer.", args.host)
    if args.share:
        logger.warning("--share: the UI is reachable by anyone with the public link.")
    print(f"dreamtune ui: http://{args.host}:{args.port} (runs in {args.root}; Ctrl-C stops the UI, not running jobs)")
    launch(args.root, host=args.host, port=args.port, share=args.share, base=args.base)
    return 0
