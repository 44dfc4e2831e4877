"""`python -m rotfuse` and the `rotfuse` script: the signal handlers first, then the CLI.

The handlers go in before the CLI's imports (typer, rich: a few tenths of a second), so a Ctrl-C
or SIGTERM during start-up ends with one line and 130/143 instead of a traceback.
"""

from rotfuse.core import signals


def main() -> None:
    signals.install()
    try:
        from rotfuse.cli import main as cli_main

        cli_main()
    except signals.Interrupted as exc:
        signals.quiet_exit(exc)


if __name__ == "__main__":
    main()
