"""Process groups: set-up from the launcher's environment, and launching (``ranks`` tells which rank this is).

Workers are started by PyTorch's own launcher, ``torch.distributed.run`` (the engine behind ``torchrun``),
which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables read here. Each rank
uses the device ``LOCAL_RANK`` of its kind; ``CUDA_VISIBLE_DEVICES`` / ``SDAA_VISIBLE_DEVICES`` decide which
physical devices those are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import devices
from .errors import DeviceError
from .ranks import job_ranks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: rank among ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (a no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first, then on the others (downloads and caches are made once)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (in place; returned for chaining)."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's ``tensors`` to every rank (in place)."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value``, on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value: object) -> list[object]:
        """``value`` of every rank, in rank order (a one-element list in a single process)."""
        if not self.enabled:
            return [value]
        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def device_kind_for_ranks(device_spec: str) -> str:
    """The device kind that several ranks share (``cpu``, ``cuda``, ``sdaa``): each takes its ``LOCAL_RANK``.

    Raises:
        DeviceError: a spec that names one device (``cuda:1``), which the ranks cannot all use, or one that
            :func:`devices.resolve_device` refuses.
    """
    kind = devices.resolve_device(device_spec).type
    if ":" in device_spec and kind != "cpu":
        raise DeviceError(
            f"--device {device_spec.strip()} names one device, and each process takes its own: use --device "
            f"{kind} and choose the devices with {kind.upper()}_VISIBLE_DEVICES"
        )
    return kind


def init_distributed(device_spec: str = "auto") -> tuple[DistributedContext, torch.device]:
    """Join the process group described by the launcher's environment, or run alone.

    Returns the context and this rank's device: ``LOCAL_RANK`` of the requested kind (sdaa, cuda) or the cpu.
    The collective backend comes from the device layer: tccl on sdaa, nccl on cuda, gloo on cpu.
    """
    ranks = job_ranks()
    if ranks is None or ranks.world_size <= 1:
        return DistributedContext(), devices.resolve_device(device_spec)
    context = DistributedContext(*ranks)
    kind = device_kind_for_ranks(device_spec)
    if kind == "cpu":
        device = torch.device("cpu")
    else:
        count = devices.device_count(kind)
        if context.local_rank >= count:
            raise DeviceError(f"local rank {context.local_rank} has no {kind} device: {count} visible on this node")
        device = torch.device(kind, context.local_rank)
        devices.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=devices.distributed_backend(device))
    log.info("rank %d of %d on %s", context.rank, context.world_size, device)
    return context, device


def shutdown(context: DistributedContext) -> None:
    """Leave the process group."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc_per_node: int, module_args: Sequence[str]) -> int:
    """Start ``nproc_per_node`` workers of ``python -m siamese_omniglot <module_args>`` on this node through
    ``torch.distributed.run`` (by :mod:`siamese_omniglot.launcher`); returns the first failed worker's exit code, or 0.

    SIGINT, SIGTERM, SIGHUP and SIGQUIT stop the launcher, which stops its workers, and raise KeyboardInterrupt once
    it has (called from the main thread, where signals are received): a job stopped through this process does not
    leave its workers training on. The launcher has a session of its own, so a terminal's Ctrl-C reaches it only this
    way, as a SIGTERM that ends the workers without a word (their checkpoints are whole: each is written to a
    temporary file and renamed).
    """
    command = [
        sys.executable, "-m", "siamese_omniglot.launcher", "--standalone", f"--nproc-per-node={nproc_per_node}",
        "-m", "siamese_omniglot", *module_args,
    ]  # fmt: skip
    log.info("launching: %s", " ".join(command))
    # the launcher's own default is one thread per worker, announced in a banner; share the cores out instead
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc_per_node))}
    launcher: subprocess.Popen | None = None
    received: list[int] = []

    def pass_on(signum: int, _frame: object) -> None:
        received.append(signum)
        if launcher is not None:
            launcher.send_signal(signal.SIGTERM)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    # installed before the launcher starts, so that no signal finds it running with no one to pass it on
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, pass_on) for signum in stops} if main_thread else {}
    try:
        launcher = subprocess.Popen(command, env=threads | os.environ, start_new_session=True)
        if received:  # a signal came while it was starting
            launcher.send_signal(signal.SIGTERM)
        code = launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and code != 0:  # a job that had finished when the signal came has finished
        raise KeyboardInterrupt
    return code
