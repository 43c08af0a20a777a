"""Device names as users write them (``auto``, ``cpu``, ``cuda:N``, ``sdaa:N``), parsed without torch.

Torch-free, so the command line can show the grammar in its help before the library loads; ``devices`` turns a
parsed name into a usable device.
"""

from __future__ import annotations

import re

from .errors import DeviceError

DEVICE_SPEC_HELP = "auto, cpu, cuda, cuda:N, sdaa or sdaa:N"
_SPEC = re.compile(r"^(auto|cpu|cuda|sdaa)(?::([0-9]+))?$")


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """The kind (``auto``, ``cpu``, ``cuda`` or ``sdaa``) and index (None where not given) that ``spec`` names."""
    match = _SPEC.match(spec.strip().lower())
    if match is None:
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_SPEC_HELP}")
    kind, index = match.group(1), match.group(2)
    return kind, None if index is None else int(index)
