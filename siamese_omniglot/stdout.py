"""Standard output as the command line writes its results there: a write that fails is one error line, a reader
that has gone (``siamese … | head -1``) ends the command quietly, and JSON is always valid JSON."""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

from .errors import OutputError

READER_GONE = 141  # the exit code of a command whose output pipe closed: 128 + SIGPIPE, as the shell reports one

_T = TypeVar("_T")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a file name's undecodable byte, as Python holds it


class ReaderGone(Exception):
    """Standard output's reader has closed its end (a pipe into ``head``): nothing more can be shown."""


class StandardOutput(io.TextIOBase):
    """``sys.stdout`` (whatever it is at each write) for a Rich console: a failed write or flush raises
    :class:`~siamese_omniglot.errors.OutputError`, a closed pipe :class:`ReaderGone`, instead of the ``OSError``
    that Rich would print as a traceback or turn into exit code 1 itself."""

    def write(self, text: str) -> int:
        return _guarded(lambda stream: _write_encodable(stream, text))

    def flush(self) -> None:
        _guarded(lambda stream: stream.flush())

    def isatty(self) -> bool:
        return sys.stdout is not None and sys.stdout.isatty()

    def fileno(self) -> int:
        if sys.stdout is None:
            raise io.UnsupportedOperation("standard output is closed")
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def _guarded(operation: Callable[[io.TextIOBase], _T]) -> _T:
    stream = sys.stdout
    if stream is None:  # the process started with descriptor 1 closed (`siamese … >&-`)
        raise OutputError("standard output is closed: the result has nowhere to go")
    try:
        return operation(stream)
    except OSError as error:
        _discard_stdout()
        if isinstance(error, BrokenPipeError):
            raise ReaderGone from None
        raise OutputError(f"standard output: cannot write the result ({error.strerror or error})") from None


def _write_encodable(stream: io.TextIOBase, text: str) -> int:
    try:
        return stream.write(text)
    except UnicodeEncodeError:  # a strict stream (PYTHONIOENCODING=utf-8:strict): a file name's undecodable bytes
        # as \xNN, as error messages show them, and what the encoding lacks as \uNNNN
        encoding = getattr(stream, "encoding", None) or "utf-8"
        shown = _SURROGATE.sub(lambda match: f"\\x{ord(match.group()) - 0xDC00:02x}", text)
        return stream.write(shown.encode(encoding, "backslashreplace").decode(encoding))


def _discard_stdout() -> None:
    """Point descriptor 1 at the null device, so that Python's last flush of what the failed write left buffered
    does not fail again at exit (with its own message and exit code 120)."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stream of the caller's, such as a test runner's
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


def json_text(data: object) -> str:
    """``data`` as indented JSON that every parser reads: non-finite numbers (a ROC AUC that means nothing) as
    ``null``, and the undecodable bytes of a file name as ``\\udcXX`` escapes, so that the text is valid UTF-8."""
    text = json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False)
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _finite(data: object) -> object:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data
