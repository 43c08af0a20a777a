"""Project exceptions: each message says what went wrong and what to do about it."""

from __future__ import annotations

INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C: 128 + SIGINT, as the shell reports one


class SiameseError(Exception):
    """Base class of every error this library raises on purpose."""


class DataError(SiameseError):
    """A data set, image or archive is missing, malformed or unusable."""


class CheckpointError(SiameseError):
    """A checkpoint is missing, corrupt, untrusted or incompatible."""


class DeviceError(SiameseError):
    """A requested device does not exist or cannot be used."""


class ConfigError(SiameseError):
    """A training or evaluation setting is out of range."""


class TrainingError(SiameseError):
    """Training cannot go on (for example the loss stopped being finite)."""


class OutputError(SiameseError):
    """An output folder or file cannot be written, or would overwrite earlier results."""


class DependencyError(SiameseError):
    """An optional package that this feature needs is not installed (see the extras ``onnx`` and ``plot``)."""


class ExportError(SiameseError):
    """A model cannot be exported, or the exported model does not reproduce the PyTorch one."""
