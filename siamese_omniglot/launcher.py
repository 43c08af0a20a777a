"""``python -m siamese_omniglot.launcher ARGS``: ``torch.distributed.run ARGS``, ending as its workers ended.

When a worker fails, torch's launcher prints a traceback of its own (``ChildFailedError``, some 35 lines, under the
worker's message) and exits with code 1; stopped by a signal, another traceback. Here the job ends with the first
failed worker's exit code: 2 for an error the worker has told, 1 for a crash whose traceback it printed, or
``128 + N`` for a worker killed by signal N, which one line names (the worker could say nothing: the kernel's
out-of-memory killer, a ``kill -9``). A launcher stopped by a signal ends quietly with ``128 + N``. Unless a log
folder, ``--redirects`` or ``--tee`` is asked for (by option or ``PET_*`` variable), its log folders, empty then, go
in a temporary folder removed at the end: torch's launcher leaves a ``torchelastic_*`` tree of them at each run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
from collections.abc import Iterator

import torch.distributed.elastic.rendezvous.registry as rendezvous_registry
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from torch.distributed.run import get_args_parser
from torch.distributed.run import main as run_launcher


def main(argv: list[str]) -> int:
    """Run the launcher with ``argv``; returns the job's exit code."""
    # torch's elastic agent logs each worker's exit and each signal it passes on, at levels of their own, errors
    # included: the workers, the line above and the command that started this process tell the user what happened
    logging.disable(logging.ERROR)
    asked = get_args_parser().parse_args(argv)  # what torch's launcher reads of them, PET_* variables included
    if asked.log_dir is not None or asked.redirects != "0" or asked.tee != "0":
        return _run(argv)
    with tempfile.TemporaryDirectory(prefix="siamese-launcher-") as logs:
        return _run([f"--log-dir={logs}", *argv])


def _run(argv: list[str]) -> int:
    """``torch.distributed.run`` with ``argv``; returns the job's exit code."""
    with _rendezvous_handlers() as handlers:
        try:
            run_launcher(argv)
        except ChildFailedError as failed:
            rank, failure = failed.get_first_failure()
            if failure.exitcode >= 0:
                return failure.exitcode
            name = signal.Signals(-failure.exitcode).name
            print(f"error: rank {rank} of the training job was killed by {name}", file=sys.stderr)
            return 128 - failure.exitcode
        except SignalException as stopped:
            # stopped by a signal, torch's launcher leaves the rendezvous open, and each handler's heartbeat thread
            # running: a handler freed in that thread, as the race may fall, stops the thread from itself, and an
            # ignored "cannot join current thread" traceback lands on stderr. Stopped here, from this thread.
            for handler in handlers:
                getattr(handler, "_stop_heartbeats", lambda: None)()
            return 128 + int(stopped.sigval)
    return 0


@contextlib.contextmanager
def _rendezvous_handlers() -> Iterator[list[RendezvousHandler]]:
    """The rendezvous handlers torch's launcher makes meanwhile, in a list that grows as it makes them."""
    made: list[RendezvousHandler] = []
    make = rendezvous_registry.get_rendezvous_handler

    def recorded(params: RendezvousParameters) -> RendezvousHandler:
        made.append(make(params))
        return made[-1]

    rendezvous_registry.get_rendezvous_handler = recorded
    try:
        yield made
    finally:
        rendezvous_registry.get_rendezvous_handler = make


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
