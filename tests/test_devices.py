"""Tests of siamese_omniglot.devices: cpu and cuda here, sdaa through a fake ``torch_sdaa`` module."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from siamese_omniglot import devices
from siamese_omniglot.errors import DeviceError

CPU = torch.device("cpu")


class FakeSdaa(types.SimpleNamespace):
    """Stands in for ``torch.sdaa``: reports ``count`` devices and records the calls it receives."""

    def __init__(self, available: bool, count: int) -> None:
        calls: list[tuple] = []
        super().__init__(
            calls=calls,
            is_available=lambda: available,
            device_count=lambda: count,
            set_device=lambda index: calls.append(("set_device", index)),
            synchronize=lambda device=None: calls.append(("synchronize", getattr(device, "index", device))),
            amp=types.SimpleNamespace(autocast=FakeAutocast, GradScaler=FakeGradScaler),
        )


class FakeAutocast(contextlib.nullcontext):
    def __init__(self, dtype=None):
        super().__init__()
        self.dtype = dtype


class FakeGradScaler:
    pass


def install_sdaa(monkeypatch, available: bool = True, count: int = 2) -> FakeSdaa:
    """Make ``import torch_sdaa`` succeed and register a fake ``torch.sdaa``."""
    if torch._C._get_privateuse1_backend_name() != "sdaa":
        torch.utils.rename_privateuse1_backend("sdaa")  # allowed once per process; lets torch.device("sdaa") exist
    fake = FakeSdaa(available, count)
    monkeypatch.setitem(sys.modules, "torch_sdaa", types.ModuleType("torch_sdaa"))
    monkeypatch.setattr(torch, "sdaa", fake, raising=False)
    return fake


@pytest.fixture
def sdaa(monkeypatch):
    return install_sdaa(monkeypatch)


@pytest.fixture
def no_sdaa(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_sdaa", None)  # makes the import raise ImportError


@pytest.fixture
def two_cudas(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# --- cpu and cuda ----------------------------------------------------------------------------------


def test_auto_without_accelerators_is_cpu(no_sdaa):
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    assert devices.resolve_device("auto") == expected
    assert devices.resolve_device() == expected
    assert devices.sdaa_module() is None
    assert not devices.is_available("sdaa") and devices.device_count("sdaa") == 0


@pytest.mark.parametrize("spec", ["cpu", " CPU ", "cpu:0"])
def test_cpu_specs(spec):
    assert devices.resolve_device(spec) == CPU


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tpu", "unknown device 'tpu': use auto, cpu, cuda, cuda:N, sdaa or sdaa:N"),
        ("cuda:x", "unknown device 'cuda:x': use auto, cpu, cuda, cuda:N, sdaa or sdaa:N"),
        ("", "unknown device '': use auto"),
        ("cpu:1", "unknown device 'cpu:1': the cpu has no index"),
        ("cuda:\u0661", "unknown device 'cuda:\u0661': use auto"),  # an Arabic-Indic one: indices are ASCII digits
    ],
)
def test_unknown_specs(spec, message):
    with pytest.raises(DeviceError) as caught:
        devices.resolve_device(spec)
    assert str(caught.value).startswith(message)


def test_cuda_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"no cuda device found for '{spec}' .*use --device cpu or auto"):
            devices.resolve_device(spec)
    assert devices.device_count("cuda") == 0


def test_cuda_indices_and_auto(two_cudas, no_sdaa):
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"device 'cuda:2' does not exist: 2 cuda device\(s\) found"):
        devices.resolve_device("cuda:2")


def test_cpu_has_no_scaler_and_one_device():
    assert devices.grad_scaler(CPU, amp=True) is None
    assert devices.device_count("cpu") == 1 and devices.is_available("cpu")


def test_cpu_autocast_runs_in_bfloat16():
    a = torch.randn(4, 4)
    with devices.autocast(CPU, enabled=True):
        assert (a @ a).dtype == torch.bfloat16
    with devices.autocast(CPU, enabled=False):
        assert (a @ a).dtype == torch.float32


def test_cpu_set_device_and_synchronize_touch_no_backend(sdaa):
    devices.set_device(CPU)
    devices.synchronize(CPU)
    assert sdaa.calls == []


# --- sdaa through a fake torch_sdaa ---------------------------------------------------------------


def test_auto_prefers_sdaa(sdaa, two_cudas):
    assert devices.resolve_device("auto") == torch.device("sdaa", 0)
    assert devices.sdaa_module() is sdaa
    assert devices.is_available("sdaa") and devices.device_count("sdaa") == 2


def test_sdaa_indices(sdaa):
    assert devices.resolve_device("sdaa") == torch.device("sdaa", 0)
    assert devices.resolve_device("SDAA:1") == torch.device("sdaa", 1)
    with pytest.raises(DeviceError, match=r"device 'sdaa:2' does not exist: 2 sdaa device\(s\) found"):
        devices.resolve_device("sdaa:2")


def test_sdaa_unavailable_falls_back(monkeypatch):
    install_sdaa(monkeypatch, available=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == CPU
    assert devices.device_count("sdaa") == 0
    with pytest.raises(DeviceError, match="no sdaa device found for 'sdaa'"):
        devices.resolve_device("sdaa")


def test_sdaa_not_installed(no_sdaa):
    with pytest.raises(DeviceError, match=r"no sdaa device found for 'sdaa:0' \(needs Tecorigin's torch_sdaa"):
        devices.resolve_device("sdaa:0")


@pytest.mark.parametrize("failure", ["ImportError('libsdaart.so.1: cannot open shared object file')",
                                     "ModuleNotFoundError('No module named torch_sdaa_ext', name='torch_sdaa_ext')",
                                     "OSError('driver version mismatch')"])
def test_a_broken_sdaa_install_is_told_once_not_taken_for_no_install(monkeypatch, tmp_path, caplog, failure):
    (tmp_path / "torch_sdaa.py").write_text(f"raise {failure}\n")  # how a vendor extension fails to load
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_sdaa", raising=False)
    monkeypatch.setattr(devices, "_IMPORT_ERRORS_TOLD", set())
    with caplog.at_level("WARNING"):
        assert devices.sdaa_module() is None and not devices.is_available("sdaa")
    assert caplog.text.count("torch_sdaa is installed but failed to import") == 1  # ImportError: silent before


def test_sdaa_amp_uses_the_vendor_module(sdaa):
    device = torch.device("sdaa", 1)
    assert devices.amp_default(device) is True
    assert devices.amp_dtype(device) == torch.float16
    assert devices.needs_grad_scaler(device, amp=True) is True
    assert devices.needs_grad_scaler(device, amp=False) is False
    assert isinstance(devices.grad_scaler(device, amp=True), FakeGradScaler)
    assert devices.grad_scaler(device, amp=False) is None
    autocast = devices.autocast(device, enabled=True)
    assert isinstance(autocast, FakeAutocast) and autocast.dtype == torch.float16
    assert not isinstance(devices.autocast(device, enabled=False), FakeAutocast)
    assert devices.distributed_backend(device) == "tccl"
    assert devices.inference_dtype(device) == torch.float32


def test_sdaa_set_device_and_synchronize_pass_the_index(sdaa):
    device = torch.device("sdaa", 1)
    devices.set_device(device)
    devices.synchronize(device)
    assert sdaa.calls == [("set_device", 1), ("synchronize", 1)]


@pytest.mark.parametrize(
    ("kind", "backend", "dtype", "amp"),
    [
        ("cpu", "gloo", torch.bfloat16, False),
        ("cuda", "nccl", torch.float16, True),
        ("sdaa", "tccl", torch.float16, True),
    ],
)
def test_device_answers(sdaa, kind, backend, dtype, amp):
    device = torch.device(kind) if kind == "cpu" else torch.device(kind, 0)
    assert devices.distributed_backend(device) == backend
    assert devices.amp_dtype(device) == dtype
    assert devices.amp_default(device) is amp
    assert devices.needs_grad_scaler(device, amp=True) is (dtype == torch.float16)
    assert devices.fuses_optimizer(device) is (kind != "sdaa")
    assert devices.inference_dtype(device) == torch.float32
