"""Multi-process training on real torch.distributed (gloo on the CPU), launched by torch.distributed.run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import siamese_omniglot as so
from siamese_omniglot import distributed
from siamese_omniglot.dllog import dllogger_callback
from siamese_omniglot.errors import DeviceError
from siamese_omniglot.train import Progress

WORKER = Path(__file__).with_name("ddp_worker.py")
SIAMESE = shutil.which("siamese") or str(Path(sys.executable).parent / "siamese")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--device", "cpu", "--batch-size", "16", "--log-every", "5"]


def torchrun(args: list[str], dump: Path) -> subprocess.CompletedProcess:
    dump.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--log-dir={dump / 'launcher-logs'}", str(WORKER), *args]
    done = subprocess.run(command, env=ENV | {"SIAMESE_TEST_DUMP": str(dump)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(stderr: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+ epoch \d+: loss ([\d.]+)", stderr, flags=re.M)]


def test_torchrun_cli_ranks_agree_loss_falls_and_only_rank0_writes(mini_background, tmp_path):
    out = tmp_path / "run"
    done = torchrun(["train", "--data", str(mini_background), "--out", str(out), "--max-steps", "20", *SMALL],
                    tmp_path / "dump")
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    # last.pt and best.pt after the epoch, then both again calibrated for the model's views: by rank 0 alone
    assert rank0["saves"] == 4 and rank1["saves"] == 0
    seen = losses(done.stderr)
    assert len(seen) == 4 and seen[-1] < seen[0]
    assert done.stdout.count("best checkpoint:") == 1  # rank 0 alone prints
    config = json.loads((out / "config.json").read_text())
    assert config["steps_per_epoch"] == 840 // 32  # 1 of 8 alphabets held out: 42 × 20 images, global batch 32
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_two_processes_equal_one_with_the_same_global_batch(mini_background, tmp_path):
    exact = {"augment": False, "batch_norm": False, "max_steps": 6, "val_pairs": 50, "log_every": 3}
    torchrun(["api", json.dumps(exact | {"batch_size": 8}), str(mini_background), str(tmp_path / "two")],
             tmp_path / "dump")
    two = torch.load(tmp_path / "dump" / "rank0.pt", weights_only=True)["params"]
    trainer = so.Trainer(so.TrainConfig(**exact, batch_size=16), so.load_training_set(mini_background),
                         tmp_path / "one", torch.device("cpu"))
    trainer.fit()
    one = dict(trainer.objective.named_parameters())
    assert {name.removeprefix("module.") for name in two} == set(one)
    start = so.Trainer(so.TrainConfig(**exact, batch_size=16), so.load_training_set(mini_background),
                       tmp_path / "unused", torch.device("cpu"))
    initial = dict(start.objective.named_parameters())
    for name, value in two.items():
        key = name.removeprefix("module.")
        assert not torch.equal(initial[key], one[key]) or "head" in key  # training moved the weights
        torch.testing.assert_close(value, one[key].detach(), atol=1e-5, rtol=1e-4)


def test_a_distributed_snapshot_gathers_every_rank_s_stream_and_only_rank0_writes_it(mini_background, tmp_path):
    config = {"max_steps": 6, "val_pairs": 50, "log_every": 3, "batch_size": 8, "views": 1}
    snapshot = tmp_path / "snapshot.pt"
    torchrun(["api", json.dumps(config), str(mini_background), str(tmp_path / "run"), str(snapshot)], tmp_path / "dump")
    saves = [torch.load(tmp_path / "dump" / f"rank{rank}.pt", weights_only=True)["saves"] for rank in (0, 1)]
    assert saves[1] == 0 and saves[0] > 0  # rank 1 validated and wrote the same file before
    training = so.load_checkpoint(snapshot)["training"]
    assert training["step"] == 3 and training["world_size"] == 2
    assert len(training["generators"]) == 2 and not torch.equal(*training["generators"])


def test_nproc_per_node_launches_through_torch_distributed_run(mini_background, tmp_path):
    out = tmp_path / "run"
    command = [SIAMESE, "train", "--data", str(mini_background), "--out", str(out), "--nproc-per-node", "2",
               "--max-steps", "10", *SMALL]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(command, env=ENV | {"TMPDIR": str(scratch)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # torch's launcher left a torchelastic_* tree of empty log folders there at each run (its compiler's cache, one a
    # user, stays as torch means it to)
    assert left_in(scratch) == []
    assert "starting 2 processes through torch.distributed.run" in done.stderr
    assert "on cpu × 2" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "config.json", "epoch_loss.png", "epoch_loss.txt", "epoch_val_loss.txt", "last.pt", "metrics.jsonl"
    ]
    state = so.load_checkpoint(out / "last.pt")
    assert state["training"]["world_size"] == 2 and state["training"]["step"] == 10


def test_a_worker_killed_without_a_word_is_named_by_the_launcher(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text("import os, signal, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends a process\n"
                      "time.sleep(60)\n")
    command = [sys.executable, "-m", "siamese_omniglot.launcher", "--standalone", "--nproc-per-node=2", str(worker)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    # torch's launcher: a 35-line traceback and code 1; with its log lines silenced, nothing at all
    assert (done.returncode, done.stderr) == (128 + signal.SIGKILL, "error: rank 1 of the training job was killed by "
                                                                    "SIGKILL\n")


SLOW_HEARTBEAT_LAUNCHER = """
import sys, threading, time
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
from siamese_omniglot import launcher

keep_alive = DynamicRendezvousHandler._keep_alive

def slow_keep_alive(handler):  # a store far away: each heartbeat holds its handler for seconds
    time.sleep(4)
    keep_alive(handler)

DynamicRendezvousHandler._keep_alive = slow_keep_alive
code = launcher.main(sys.argv[1:])
print(*sorted(thread.name for thread in threading.enumerate()))
sys.exit(code)
"""


def test_a_launcher_stopped_by_a_signal_stops_its_rendezvous_heartbeat_before_it_returns(tmp_path):
    # left running, the heartbeat thread could free the handler, stop itself through it and print a traceback (CI saw
    # one, "RuntimeError: cannot join current thread"); a slow heartbeat holds the handler most of the time
    worker = tmp_path / "worker.py"
    worker.write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    command = [sys.executable, "-c", SLOW_HEARTBEAT_LAUNCHER, "--standalone", "--nproc-per-node=1",
               "--rdzv-conf=keep_alive_interval=1", str(worker)]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout.readline() == "ready\n"
    time.sleep(2)  # a heartbeat or two
    launcher.send_signal(signal.SIGTERM)
    told, stderr = launcher.communicate(timeout=120)
    assert (launcher.returncode, told, stderr) == (128 + signal.SIGTERM, "MainThread\n", "")


@pytest.mark.parametrize("asked", ["options", "variables"])
def test_the_launcher_keeps_the_worker_logs_asked_for(tmp_path, asked):
    worker = tmp_path / "worker.py"
    worker.write_text("import os\nprint('rank', os.environ['RANK'])\n")
    logs, scratch = tmp_path / "logs", tmp_path / "tmp"
    scratch.mkdir()
    options = {"options": [f"--log-dir={logs}", "--redirects=3"], "variables": []}[asked]
    variables = {"options": {}, "variables": {"PET_LOG_DIR": str(logs), "PET_REDIRECTS": "3"}}[asked]
    command = [sys.executable, "-m", "siamese_omniglot.launcher", "--standalone", "--nproc-per-node=2", *options,
               str(worker)]
    done = subprocess.run(command, env=ENV | variables | {"TMPDIR": str(scratch)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # the workers' output, redirected into the log folder asked for, is kept there
    told = sorted(path.read_text() for path in logs.glob("*/attempt_0/*/stdout.log"))
    assert told == ["rank 0\n", "rank 1\n"]
    assert left_in(scratch) == []


def test_an_error_every_worker_meets_is_told_once_with_exit_code_2(mini_background, tmp_path):
    command = [SIAMESE, "train", "--data", str(mini_background), "--out", str(tmp_path / "run"),
               "--nproc-per-node", "2", "--max-steps", "10", *SMALL[:2], "--batch-size", "100000"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    # each rank told it before, then the launcher's 35-line traceback, and the job's exit code was 1
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "starting 2 processes through torch.distributed.run"
    told = r"error: batch size 100000 × 2 processes exceeds the \d+ training images: an epoch must hold one batch"
    assert len(lines) == 2 and re.fullmatch(told + " at least; lower --batch-size", lines[1])


@pytest.mark.parametrize(("signum", "to_group"),
                         [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True),
                          (signal.SIGHUP, True)],
                         ids=["SIGTERM", "SIGINT", "Ctrl-C", "terminal-closed"])
def test_stopping_the_launching_command_stops_its_workers(mini_background, tmp_path, signum, to_group):
    out = tmp_path / "run"
    command = [SIAMESE, "train", "--data", str(mini_background), "--out", str(out), "--nproc-per-node", "2",
               "--epochs", "50", *SMALL]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with (tmp_path / "stderr").open("w") as stderr:
        # a session of its own: the signal reaches the command alone, as `kill`, a scheduler or `docker stop` send it,
        # or its whole process group, as a terminal's Ctrl-C does
        parent = subprocess.Popen(command, env=ENV | {"TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL, stderr=stderr,
                                  start_new_session=True)
        deadline = time.monotonic() + 300
        while not re.search(r"^step \d+/", (tmp_path / "stderr").read_text(), re.M) and time.monotonic() < deadline:
            assert parent.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(parent.pid, signum) if to_group else parent.send_signal(signum)
        code = parent.wait(timeout=120)
    told = (tmp_path / "stderr").read_text()
    assert code == 130
    # once, and no launcher traceback: every rank and the launcher told it before
    assert told.count("interrupted; checkpoints already written are intact") == 1 and "Traceback" not in told, told
    assert not re.search(r"^[WE]\d{4} ", told, re.M), told  # nor the launcher's log lines ("Received 15 death signal")
    # the launcher and its workers have stopped too: they trained on, orphaned, before
    assert running_with(str(out)) == []
    assert left_in(scratch) == []  # nor its log folders


def left_in(scratch: Path) -> list[str]:
    """What a run left in its temporary folder ``scratch``, torch's compiler cache aside."""
    return [path.name for path in scratch.iterdir() if not path.name.startswith("torchinductor_")]


def running_with(text: str) -> list[int]:
    """Processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # it ended meanwhile
            continue
    return found


@pytest.mark.parametrize("extra", [["--distributed", "False"], ["--nproc_per_node", "2", "--distributed", "True"]],
                         ids=["single", "ddp"])
def test_reference_command_lines_run_as_written(mini_background, tmp_path, extra):
    out = tmp_path / "run"
    reference = ["--model_name", "Siamese", "--batch_size", "8", "--lr", "1e-2", "--device", "cpu", "--epoch", "50",
                 "--use_amp", "True", "--train_data_path", str(mini_background)]
    command = [SIAMESE, "train", *reference, *extra, "--max-steps", "2", "--preset", "fast", "--out", str(out)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 50 and config["train"]["batch_size"] == 8 and config["amp"] is True
    assert so.load_checkpoint(out / "last.pt")["training"]["world_size"] == (2 if "--nproc_per_node" in extra else 1)


def test_reference_model_name_must_be_siamese(tmp_path):
    done = subprocess.run([SIAMESE, "train", "--model_name", "ResNet", "--out", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --model_name 'ResNet': only Siamese is provided"


def test_sdaa_rank_uses_tccl_and_its_local_device(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 2, set_device=lambda i: calls.append(("set_device", i)),
    )
    monkeypatch.setitem(sys.modules, "torch_sdaa", types.ModuleType("torch_sdaa"))
    monkeypatch.setattr(torch, "sdaa", fake, raising=False)
    if torch._C._get_privateuse1_backend_name() != "sdaa":
        torch.utils.rename_privateuse1_backend("sdaa")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    context, device = distributed.init_distributed("sdaa")
    assert (context.rank, context.world_size, context.local_rank) == (1, 2, 1)
    assert device == torch.device("sdaa", 1)
    assert calls == [("set_device", 1), ("init", "tccl")]
    monkeypatch.setenv("LOCAL_RANK", "2")  # e.g. SDAA_VISIBLE_DEVICES left two devices for three ranks
    with pytest.raises(DeviceError, match="local rank 2 has no sdaa device: 2 visible on this node"):
        distributed.init_distributed("sdaa")


def test_several_ranks_refuse_a_device_index_they_cannot_all_use(monkeypatch):
    fake = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2, set_device=lambda i: None)
    monkeypatch.setitem(sys.modules, "torch_sdaa", types.ModuleType("torch_sdaa"))
    monkeypatch.setattr(torch, "sdaa", fake, raising=False)
    if torch._C._get_privateuse1_backend_name() != "sdaa":
        torch.utils.rename_privateuse1_backend("sdaa")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    message = "--device sdaa:1 names one device, and each process takes its own: use --device sdaa and choose the " \
              "devices with SDAA_VISIBLE_DEVICES"
    with pytest.raises(DeviceError, match=re.escape(message)):
        distributed.init_distributed("sdaa:1")  # rank 0 ran on sdaa:0 before, without a word
    assert distributed.init_distributed("cpu:0")[1] == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed("sdaa:1")[1] == torch.device("sdaa", 1)


def test_dllogger_records_use_explicit_units(monkeypatch, tmp_path):
    logged, metadata = [], {}

    class Logger:
        def __init__(self, backends):
            self.backends = backends

        def metadata(self, name, values):
            metadata[name] = values

        def log(self, step, data, verbosity):
            logged.append((step, data, verbosity))

    fake = types.SimpleNamespace(
        Logger=Logger, JSONStreamBackend=lambda verbosity, path: ("json", verbosity, path),
        Verbosity=types.SimpleNamespace(VERBOSE="verbose", DEFAULT="default"),
    )
    monkeypatch.setitem(sys.modules, "tcap_dllogger", fake)
    record = dllogger_callback(tmp_path / "dllogger.json")
    record(Progress(step=50, total_steps=100, epoch=0, loss=1.5, lr=0.1, pairs_per_s=300.0, images_per_s=600.0))
    assert metadata["train.pairs_per_s"]["unit"] == "pairs/s" and metadata["train.images_per_s"]["unit"] == "images/s"
    assert logged == [((0, 50), {"train.loss": 1.5, "train.lr": 0.1, "train.pairs_per_s": 300.0,
                                 "train.images_per_s": 600.0}, "default")]


def test_dllogger_absent_means_no_records(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tcap_dllogger", None)  # import raises ImportError
    assert dllogger_callback(tmp_path / "dllogger.json") is None
