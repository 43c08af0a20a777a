"""The ``siamese`` console script and ``python -m siamese_omniglot``: the command line, loaded so that a Ctrl-C
while it loads ends as one in a command does (``interrupted``, exit code 130), not with a traceback."""

import signal
import sys

from .errors import INTERRUPTED


def main() -> None:
    """Load and run the command line (:func:`siamese_omniglot.cli.main`). Once it is interrupted, the process
    ignores a second Ctrl-C, which would break its shutdown (torch's exit handlers) with a traceback."""
    try:
        from .cli import main as run_command_line
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from .ranks import is_secondary_rank

        if not is_secondary_rank():  # rank 0 of a training job tells it, as a command does
            print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    try:
        run_command_line()
    except SystemExit as exit:
        if exit.code == INTERRUPTED:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    main()
