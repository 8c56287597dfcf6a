"""Print the config reference (every option, its default and help) as Markdown, for the README."""

from dreamtune.config import options_help


def main() -> None:
    section = None
    for sec, name, default, help_text in options_help():
        if sec != section:
            section = sec
            print(f"\n**{sec}**\n\n| option | default | what it does |\n|---|---|---|")
        shown = "per method" if default is None else f"`{default!r}`"
        print(f"| `{name}` | {shown} | {help_text} |")


if __name__ == "__main__":
    main()
