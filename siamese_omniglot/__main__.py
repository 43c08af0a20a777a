"""The ``siamese`` console script and ``python -m siamese_omniglot``: the command line, loaded so that a Ctrl-C
while it loads ends as one in a command does (``interrupted``, exit code 130), not with a traceback."""

import signal
import sys


def main() -> None:
    """Load and run the command line (:func:`siamese_omniglot.cli.main`)."""
    try:
        from .cli import main as run_command_line
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would interrupt the shutdown with a traceback
        from .ranks import is_secondary_rank

        if not is_secondary_rank():  # rank 0 of a training job tells it, as a command does
            print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    run_command_line()


if __name__ == "__main__":
    main()
