"""The device layer: picks sdaa, cuda or cpu and answers every device-specific question.

Tecorigin SDAA cards are reached through the vendor's ``torch_sdaa`` package, which registers
``torch.sdaa`` when imported. It is optional: this module imports it only when present.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from types import ModuleType

import torch

from .device_spec import parse_device_spec
from .errors import DeviceError

log = logging.getLogger(__name__)
_IMPORT_ERRORS_TOLD: set[str] = set()  # torch_sdaa's import errors already warned of, once per process


def sdaa_module() -> ModuleType | None:
    """Return ``torch.sdaa`` after importing ``torch_sdaa``, or None where it is not installed."""
    try:
        importlib.import_module("torch_sdaa")
    except Exception as error:  # a broken vendor install (a library missing, an ABI mismatch) must not stop cpu/cuda
        broken = not (isinstance(error, ModuleNotFoundError) and error.name == "torch_sdaa")  # else: not installed
        if broken and str(error) not in _IMPORT_ERRORS_TOLD:  # each check of the devices tries the import again
            _IMPORT_ERRORS_TOLD.add(str(error))
            log.warning("torch_sdaa is installed but failed to import (%s); sdaa devices are unavailable", error)
        return None
    return getattr(torch, "sdaa", None)


def _backend(kind: str) -> ModuleType | None:
    if kind == "cuda":
        return torch.cuda
    if kind == "sdaa":
        return sdaa_module()
    return None


def is_available(kind: str) -> bool:
    """Whether devices of this kind (``cpu``, ``cuda``, ``sdaa``) can be used here."""
    if kind == "cpu":
        return True
    backend = _backend(kind)
    return backend is not None and bool(backend.is_available())


def device_count(kind: str) -> int:
    """Number of devices of this kind (1 for cpu, 0 when the kind is unavailable)."""
    if kind == "cpu":
        return 1
    return int(_backend(kind).device_count()) if is_available(kind) else 0


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|sdaa|sdaa:N`` into a usable ``torch.device``.

    ``auto`` prefers sdaa (when ``torch_sdaa`` imports and reports a device), then cuda, then cpu.
    """
    kind, index = parse_device_spec(spec)
    if kind == "auto":
        kind = next(k for k in ("sdaa", "cuda", "cpu") if is_available(k))
        return torch.device(kind, 0) if kind != "cpu" else torch.device("cpu")
    if kind == "cpu":
        if index not in (None, 0):
            raise DeviceError(f"unknown device {spec!r}: the cpu has no index")
        return torch.device("cpu")
    if not is_available(kind):
        hint = "needs Tecorigin's torch_sdaa and a card" if kind == "sdaa" else "needs a CUDA build of torch and a GPU"
        raise DeviceError(f"no {kind} device found for {spec!r} ({hint}); use --device cpu or auto")
    count = device_count(kind)
    number = index or 0
    if number >= count:
        raise DeviceError(f"device {spec!r} does not exist: {count} {kind} device(s) found")
    return torch.device(kind, number)


def set_device(device: torch.device) -> None:
    """Make ``device`` the current device of its kind (a no-op on cpu)."""
    backend = _backend(device.type)
    if backend is not None and device.index is not None:
        backend.set_device(device.index)


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on cpu)."""
    backend = _backend(device.type)
    if backend is not None:
        backend.synchronize(device.index)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for training on ``device``: float16 on accelerators, bfloat16 on cpu."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def amp_default(device: torch.device) -> bool:
    """Whether mixed precision is on by default: on accelerators yes, on cpu no (bf16 is slow there)."""
    return device.type != "cpu"


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """A loss scaler is needed exactly when training runs in float16."""
    return amp and amp_dtype(device) == torch.float16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast context for training on ``device``; sdaa uses ``torch.sdaa.amp`` where torch.amp does not."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "sdaa":
        return sdaa_module().amp.autocast(dtype=amp_dtype(device))
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """A gradient scaler where float16 training needs one, else None."""
    if not needs_grad_scaler(device, amp):
        return None
    if device.type == "sdaa":
        return sdaa_module().amp.GradScaler()
    return torch.amp.GradScaler(device.type)


def fuses_optimizer(device: torch.device) -> bool:
    """Whether the optimizer steps as torch's fused kernel on ``device``: on cpu and cuda, not on sdaa (whose
    fused kernels are not known). Fused, a float16 loss scaler skips overflowed steps without a host sync."""
    return device.type in ("cpu", "cuda")


def distributed_backend(device: torch.device) -> str:
    """The collective backend for ``device``: tccl on sdaa, nccl on cuda, gloo on cpu."""
    return {"sdaa": "tccl", "cuda": "nccl"}.get(device.type, "gloo")


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (None on cpu, or where the backend cannot tell: then memory is not a limit)."""
    backend = _backend(device.type)
    mem_get_info = getattr(backend, "mem_get_info", None)
    if mem_get_info is None:
        return None
    free, _total = mem_get_info(device.index)
    return int(free)


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout convolutions run fastest in on ``device``: channels-last on cuda (tensor cores) and on the cpu
    (oneDNN; for the cpu figures see the throughput and evaluation-speed rows of docs/results.md), else
    contiguous."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` may be used: not on sdaa, whose compiler supports only a subset of it."""
    return device.type != "sdaa"


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype of inference: float32 on every device (on sdaa a rule, not a default)."""
    return torch.float32

