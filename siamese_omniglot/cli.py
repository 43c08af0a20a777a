"""The ``siamese`` command line: a thin shell over the library that parses options and prints with Rich.

Results go to standard output; progress, warnings and errors to standard error. Any expected failure
(bad path, bad data, bad checkpoint, unknown device) prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .config import PRESETS, preset
from .data.roots import DATA_ENV, DEFAULT_ROOT, MIRROR_ENV
from .device_spec import DEVICE_SPEC_HELP, parse_device_spec
from .errors import INTERRUPTED, ConfigError, OutputError, SiameseError, TrainingError
from .ranks import defer_to_rank0, is_secondary_rank, job_ranks
from .stdout import READER_GONE, ReaderGone, StandardOutput, json_text

if TYPE_CHECKING:  # torch and what needs it are imported inside the commands, so --help answers at once
    from .data.omniglot import ProgressFn
    from .train import Validation

app = typer.Typer(
    name="siamese",
    help="One-shot handwritten-character verification with Siamese networks (Omniglot; SDAA, CUDA or CPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# emoji off: a name such as `x:smile:.png` is shown as it is
out = Console(file=StandardOutput(), soft_wrap=True, emoji=False)  # results
err = Console(stderr=True, soft_wrap=True, emoji=False)
log = logging.getLogger("siamese_omniglot")

DataOption = Annotated[
    Path | None,
    typer.Option("--data", help="Data root: Omniglot archives or folders, or a custom <group>/<class>/<image> "
                 f"tree \\[default: ${DATA_ENV}, else ./{DEFAULT_ROOT}]"),
]
MirrorOption = Annotated[
    str | None,
    typer.Option("--mirror", help=f"Base URL or local folder holding images_background.zip and "
                 f"images_evaluation.zip, used when they are missing \\[default: ${MIRROR_ENV}]"),
]


def _known_device(spec: str) -> str:
    """``--device``'s check of its spelling, before torch loads: a misspelt name is refused at once."""
    with _errors_as_exit():
        parse_device_spec(spec)
    return spec


def _known_preset(name: str | None) -> str | None:
    """``--preset``'s check of its name, before torch loads."""
    if name is not None:
        with _errors_as_exit():
            preset(name)
    return name


DeviceOption = Annotated[str, typer.Option("--device", callback=_known_device, help=f"Device: {DEVICE_SPEC_HELP}")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object")]
SkipBadImagesOption = Annotated[
    bool, typer.Option("--skip-bad-images", help="Leave out unreadable images (listed in a warning) instead of "
                       "refusing the data set")
]
# what `eval` draws and scores in memory at once: a few GB at these sizes
MOST_PAIRS = 10_000_000  # --pairs (same and different each)
MOST_SUPPORT_IMAGES = 10_000_000  # --trials × --way × --shot
CheckpointOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="Trained checkpoint (best.pt) \\[default: the bundled fast model]",
                 show_default=False),
]


def _print_json(data: dict) -> None:
    """A command's result as one JSON object on standard output (see :func:`siamese_omniglot.stdout.json_text`)."""
    out.print(json_text(data), markup=False, highlight=False)


def _print_version(asked: bool) -> None:
    if asked:
        with _errors_as_exit():
            out.print(f"siamese-omniglot {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The options before a command."""


@contextlib.contextmanager
def _errors_as_exit(interrupted: str = "interrupted", ranked: bool = False) -> Iterator[None]:
    """Turn the library's expected failures into one stderr line and exit code 2, and Ctrl-C into the line
    ``interrupted`` and exit code 130. ``ranked``: the command is one rank of a training job, where rank 0 tells
    what every rank meets alike."""
    secondary = ranked and is_secondary_rank()
    try:
        yield
    except SiameseError as error:
        if secondary:
            defer_to_rank0()
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2) from None
    except ReaderGone:  # `siamese … | head -1`: what it wanted was shown
        raise typer.Exit(READER_GONE) from None
    except KeyboardInterrupt:  # the process then ignores a second one (siamese_omniglot.__main__), a caller does not
        if not secondary:  # rank 0, or the command that launched the ranks, tells it
            err.print(interrupted, highlight=False)
        raise typer.Exit(INTERRUPTED) from None


@contextlib.contextmanager
def _progress_bar() -> Iterator[ProgressFn]:
    """A progress callback ``(what, done, total)``: a Rich bar on a terminal, else :func:`_plain_progress`."""
    if not err.is_terminal:
        yield _plain_progress()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = progress.add_task(what, total=total or None)
            progress.update(tasks[what], completed=done)

        yield update


def _plain_progress(
    every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
) -> ProgressFn:
    """Progress where standard error is no terminal (a log file, CI): a line such as ``decode images_background:
    41%, under a minute left`` every ``every_s`` seconds of a task, none for a task done sooner."""
    started: dict[str, float] = {}
    told: dict[str, float] = {}

    def update(what: str, done: int, total: int) -> None:
        now = clock()
        began = started.setdefault(what, now)
        if 0 < done < total and now - told.get(what, began) >= every_s:
            told[what] = now
            left = _time_left((now - began) * (total - done) / done)
            err.print(f"{what}: {done / total:.0%}, {left}", highlight=False)

    return update


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)


def _truth(value: str | None, option: str) -> bool | None:
    """The reference's ``True``/``False`` option values."""
    if value is None:
        return None
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    if value.strip().lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"{option} takes True or False, not {value!r}")


def _validation_summary(one_shot: float | None, roc_auc: float, accuracy: float, threshold: float) -> str:
    """One validation in the words of ``siamese train``'s closing lines."""
    prefix = "" if one_shot is None else f"val 1-shot {one_shot:.4f}, "
    return f"{prefix}val ROC AUC {roc_auc:.4f}, val accuracy {accuracy:.4f} at threshold {threshold:.4f}"


def _summary_of(val: Validation) -> str:
    """:func:`_validation_summary` of a ``Validation``."""
    return _validation_summary(val.one_shot, val.pairs.roc_auc, val.pairs.accuracy, val.pairs.threshold)


@app.command()
def train(
    preset_name: Annotated[
        str | None,
        typer.Option("--preset", callback=_known_preset,
                     help=f"Training preset: {', '.join(PRESETS)} \\[default: fast]"),
    ] = None,
    data: DataOption = None,
    mirror: MirrorOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder \\[default: logs/<timestamp>]")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Epochs \\[default: preset's]")
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", min=1,
                     help="End the run after this many optimizer steps (the schedule is fitted to them)"),
    ] = None,
    stop_after: Annotated[
        int | None,
        typer.Option("--stop-after", min=1,
                     help="Pause once the run has taken this many steps in all, writing last.pt there; the "
                     "schedule is unchanged, so --resume later ends with the weights of an unpaused run"),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1,
                     help="Items per step and process (pair objective: 1 item = 2 pairs)"),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate for a global batch of 64 (scaled linearly)")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed \\[default: preset's]")] = None,
    device: DeviceOption = "auto",
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="Mixed precision \\[default: on for sdaa/cuda, off on cpu]")
    ] = None,
    pretrained: Annotated[
        bool | None, typer.Option("--pretrained", help="vgg16 only: start from ImageNet weights (needs internet)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run of this last.pt with its own settings (only --epochs, "
                     "--max-steps, --log-every and --skip-bad-images may be given; --stop-after pauses it again)"),
    ] = None,
    nproc_per_node: Annotated[
        int, typer.Option("--nproc-per-node", min=1,
                          help="Processes on this machine, one per device, started by torch.distributed.run")
    ] = 1,
    log_every: Annotated[
        int | None, typer.Option("--log-every", min=1, help="Steps between progress reports \\[default: 50]")
    ] = None,
    staging: Annotated[
        str, typer.Option("--staging", help="Where the training images live: auto (the device when they fit in "
                          "half its free memory, else host memory), device or host")
    ] = "auto",
    compile_step: Annotated[
        bool, typer.Option("--compile", help="Compile the training step with torch.compile (cuda and cpu; slow "
                           "to start, faster per step on GPUs)")
    ] = False,
    skip_bad_images: SkipBadImagesOption = False,
    distributed: Annotated[
        str | None, typer.Option("--distributed", hidden=True, help="Reference spelling: True/False")
    ] = None,
    use_amp: Annotated[
        str | None, typer.Option("--use_amp", hidden=True, help="Reference spelling: True/False")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model_name", hidden=True, help="Reference: Siamese (selects the seed preset)")
    ] = None,
    # the reference's spellings of options above: hidden, as beside every option they crowded the help's columns
    train_data_path: Annotated[Path | None, typer.Option("--train_data_path", hidden=True)] = None,
    epoch: Annotated[int | None, typer.Option("--epoch", min=1, hidden=True)] = None,
    max_steps_spelt: Annotated[int | None, typer.Option("--max_steps", min=1, hidden=True)] = None,
    batch_size_spelt: Annotated[int | None, typer.Option("--batch_size", min=1, hidden=True)] = None,
    nproc_per_node_spelt: Annotated[int | None, typer.Option("--nproc_per_node", min=1, hidden=True)] = None,
) -> None:
    """Train a Siamese network on Omniglot's background alphabets (or a custom tree).

    The reference's command lines run as written, in its spellings too:
    --train_data_path, --epoch, --batch_size, --max_steps, --nproc_per_node, --model_name, --use_amp, --distributed.
    """
    _setup_logging()
    with _errors_as_exit("interrupted; checkpoints already written are intact", ranked=True):
        from .data.omniglot import load_training_set
        from .distributed import device_kind_for_ranks, init_distributed, launch, shutdown
        from .staging import check_placement
        from .train import Trainer, check_run_dir, default_out_dir, resume_config

        data = _one_of("--data", data, "--train_data_path", train_data_path)
        epochs = _one_of("--epochs", epochs, "--epoch", epoch)
        max_steps = _one_of("--max-steps", max_steps, "--max_steps", max_steps_spelt)
        batch_size = _one_of("--batch-size", batch_size, "--batch_size", batch_size_spelt)
        nproc_per_node = _one_of("--nproc-per-node", None if nproc_per_node == 1 else nproc_per_node,
                                 "--nproc_per_node", nproc_per_node_spelt) or 1
        if model_name is not None and model_name.lower() != "siamese":
            raise ConfigError(f"--model_name {model_name!r}: only Siamese is provided")
        amp = amp if use_amp is None else _truth(use_amp, "--use_amp")
        check_placement(staging)
        processes = nproc_per_node if _truth(distributed, "--distributed") is not False else 1
        if resume is None:
            settings = dict(batch_size=batch_size, lr=lr, seed=seed, amp=amp, pretrained=pretrained)
            default = "seed" if model_name is not None else "fast"  # the reference's recipe for its command lines
            config = preset(preset_name or default, epochs=epochs, max_steps=max_steps, log_every=log_every, **settings)
            run_dir = out_dir or default_out_dir()
        else:
            fixed = {"--preset": preset_name, "--batch-size": batch_size, "--lr": lr, "--seed": seed, "--amp": amp,
                     "--pretrained": pretrained}
            given = [name for name, value in fixed.items() if value is not None]
            if given:
                raise ConfigError(f"--resume continues with the checkpoint's settings; drop {', '.join(given)}")
            config = resume_config(resume, epochs=epochs, max_steps=max_steps, log_every=log_every)
            run_dir = out_dir or resume.parent
        _check_outside_data(run_dir, data, "--out")
        if processes > 1 and job_ranks() is None:  # this command launches the ranks
            device_kind_for_ranks(device)
            check_run_dir(run_dir, resume)
            with _progress_bar() as update:  # fetch and decode once, before the workers
                load_training_set(data, mirror, progress=update, skip_bad_images=skip_bad_images)
            err.print(f"starting {processes} processes through torch.distributed.run", highlight=False)
            args = _worker_args(config, resume, data=data, mirror=mirror, out=run_dir, device=device,
                                epochs=epochs, max_steps=max_steps, stop_after=stop_after,
                                skip_bad_images=skip_bad_images or None, staging=staging,
                                compile=compile_step or None)
            code = launch(processes, ["train", *args])
            if code == 2:  # the workers' error, told by them
                raise typer.Exit(2)
            if code != 0:
                raise TrainingError(f"the training processes failed (exit code {code}); see their messages above")
            return
        context, torch_device = init_distributed(device)
        if context.is_main:  # before the data is fetched and decoded; fit() checks again for library callers
            check_run_dir(run_dir, resume)
        with context.main_first(), _progress_bar() as update:
            images = load_training_set(data, mirror, progress=update if context.is_main else None,
                                       skip_bad_images=skip_bad_images)
        try:
            records = run_dir / "dllogger.json" if context.is_main else None
            with _training_display(records) as (announce, on_progress, on_epoch):
                where = f"{torch_device} × {context.world_size}" if context.enabled else str(torch_device)

                def on_start() -> None:  # the run is accepted: data, checkpoint and --stop-after all fit
                    _check_writable(run_dir, make=True)
                    line = f"training preset {config.preset} on {where} → {run_dir}"
                    if resume is not None:
                        step, total = trainer.step, trainer.total_steps
                        line += (f", resumed at step {step} of {total}" if step < total else
                                 f": {resume} is at its last step ({total}), nothing to train")
                    announce(line)

                trainer = Trainer(config, images, run_dir, torch_device, on_progress, on_epoch, on_start=on_start,
                                  dist=context, staging=staging, compile=compile_step)
                result = trainer.fit(resume=resume, stop_after=stop_after)
        finally:
            shutdown(context)
    if not context.is_main:
        return
    with _errors_as_exit():  # the run is done: only a failed write of its summary remains
        best = result.best_epoch
        if best is not None:
            summary = _validation_summary(best.val_one_shot, best.val_roc_auc, best.val_accuracy, best.threshold)
            out.print(f"best checkpoint: {result.best_checkpoint} ({summary})", markup=False, highlight=False)
        else:
            out.print("no best checkpoint yet: the first epoch ends after the pause", markup=False, highlight=False)
        if result.averaged is not None:
            epochs = " and ".join(map(str, result.averaged_epochs))
            out.print(f"weights of epochs {epochs} averaged: {_summary_of(result.averaged)}", markup=False,
                      highlight=False)
        if result.best_with_views is not None:
            val = result.best_with_views
            out.print(f"with {val.views} views per image: {_summary_of(val)}", markup=False, highlight=False)
        out.print(f"last checkpoint: {result.last_checkpoint}", markup=False, highlight=False)
        if trainer.step < trainer.total_steps:
            out.print(f"paused at step {trainer.step} of {trainer.total_steps}; continue with: siamese train --resume "
                      f"{result.last_checkpoint}", markup=False, highlight=False)


def _check_writable(folder: Path, make: bool = False) -> None:
    """Refuse now, before the work, a folder that nothing can be written in: a run folder (``make``: made here) or
    one for pictures (made when they are drawn, so its nearest existing parent is tried)."""
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OutputError(f"{folder}: cannot write there ({error.strerror or error})") from None


def _worker_args(config, resume: Path | None, **given) -> list[str]:
    """The ``train`` options of one worker: everything resolved here, passed explicitly."""
    if resume is not None:
        values = {"resume": resume, "log_every": config.log_every, **given}
    else:
        settings = {k: v for k, v in config.to_dict().items() if k in ("batch_size", "lr", "seed", "log_every")}
        values = {"preset": config.preset, **settings, **given}
        values |= {"amp": config.amp, "pretrained": config.pretrained or None}
    args: list[str] = []
    for name, value in values.items():
        option = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(option if value else f"--no-{name}")
        else:
            args += [option, str(value)]
    return args


@contextlib.contextmanager
def _training_display(records: Path | None):
    """``announce(line)``, to call once a run is accepted, and the Trainer's ``on_progress`` and ``on_epoch``: a live
    bar with loss, pairs/s and ETA on a terminal, plain lines otherwise. From the announcement on, progress also
    goes to ``records`` through ``tcap_dllogger`` when that is installed; before it nothing is shown or written,
    so a run refused while it starts leaves only its error."""
    from .dllog import dllogger_callback
    from .train import EpochMetrics
    from .train import Progress as TrainProgress

    record = None
    bar = None if not err.is_terminal else Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), console=err)
    task = bar.add_task("training", total=None, status="") if bar is not None else None

    def announce(line: str) -> None:
        nonlocal record
        err.print(line, markup=False, highlight=False)
        record = dllogger_callback(records) if records is not None else None
        if bar is not None:
            bar.start()

    first_report: tuple[float, int] | None = None  # (time, step) of the first report, to time the steps since

    def on_progress(p: TrainProgress) -> None:
        nonlocal first_report
        if bar is None:
            now = time.monotonic()
            left = ""
            if first_report is None:
                first_report = now, p.step
            elif p.step < p.total_steps and p.step > first_report[1]:
                seconds_per_step = (now - first_report[0]) / (p.step - first_report[1])  # validations included
                left = f", {_time_left(seconds_per_step * (p.total_steps - p.step))}"
            err.print(f"step {p.step}/{p.total_steps} epoch {p.epoch + 1}: loss {p.loss:.4f}, lr {p.lr:.3g}, "
                      f"{p.pairs_per_s:,.0f} pairs/s, {p.images_per_s:,.0f} images/s{left}", highlight=False)
        else:
            bar.update(task, total=p.total_steps, completed=p.step,
                       status=f"loss {p.loss:.4f} · {p.pairs_per_s:,.0f} pairs/s")
        if record is not None:
            record(p)

    def on_epoch(m: EpochMetrics) -> None:
        line = (f"epoch {m.epoch} step {m.step}: train loss {m.train_loss:.4f}, val loss {m.val_loss:.4f}, "
                f"val accuracy {m.val_accuracy:.4f}, val ROC AUC {m.val_roc_auc:.4f}"
                + ("" if m.val_one_shot is None else f", val 1-shot {m.val_one_shot:.4f}")
                + f", {m.pairs_per_s:,.0f} pairs/s")
        (err if bar is None else bar.console).print(line, highlight=False)

    try:
        yield announce, on_progress, on_epoch
    finally:
        if bar is not None:
            bar.stop()


@app.command("eval")
def evaluate(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(metavar="CHECKPOINT", help="Checkpoint to evaluate (best.pt or last.pt of a run) \\[default: "
                       "the bundled fast model]", show_default=False),
    ] = None,
    data: DataOption = None,
    mirror: MirrorOption = None,
    runs: Annotated[
        Path | None, typer.Option("--runs", help="Lake's all_runs.zip (or a folder in its layout) to score")
    ] = None,
    way: Annotated[int, typer.Option("--way", min=2, help="Candidates per one-shot trial")] = 20,
    shot: Annotated[int, typer.Option("--shot", min=1, help="Support images per candidate")] = 1,
    trials: Annotated[int, typer.Option("--trials", min=1, help="One-shot trials to sample")] = 400,
    pairs: Annotated[int, typer.Option("--pairs", min=10, help="Same and different verification pairs each")] = 1000,
    negatives: Annotated[
        str, typer.Option("--negatives", help="Where a different pair's second image comes from: alphabet (another "
                          "character of the first one's alphabet, the harder test) or any (any other character, as "
                          "in the reference's pairs)")
    ] = "alphabet",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampled trials and pairs")] = 0,
    device: DeviceOption = "auto",
    skip_bad_images: SkipBadImagesOption = False,
    as_json: JsonOption = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Folder to draw roc.png (verification ROC curve) and hardest_trials.png (the "
                     "hardest one-shot trials: query, true class, chosen class) in; needs matplotlib"),
    ] = None,
) -> None:
    """Evaluate on alphabets never seen in training: verification and N-way K-shot one-shot accuracy."""
    _setup_logging()
    with _errors_as_exit():
        from .data.episodes import load_lake_runs, sample_episodes
        from .data.omniglot import load_evaluation_set
        from .data.pairs import NEGATIVES, fixed_pairs
        from .evaluate import embed_pixels, lake_runs_accuracy, one_shot_accuracy, pair_logits, pair_metrics
        from .verify import Verifier, default_checkpoint

        if negatives not in NEGATIVES:
            raise ConfigError(f"unknown --negatives {negatives!r}: choose one of {', '.join(NEGATIVES)}")
        design = NEGATIVES[negatives]
        if pairs > MOST_PAIRS:
            raise ConfigError(f"--pairs {pairs}: at most {MOST_PAIRS:,} same and different pairs each fit in memory")
        if trials * way * shot > MOST_SUPPORT_IMAGES:
            raise ConfigError(f"--trials {trials} × --way {way} × --shot {shot}: at most {MOST_SUPPORT_IMAGES:,} "
                              "support images in all fit in memory; lower --trials")
        if plot is not None:
            _require_plotting()
            if plot.exists() and not plot.is_dir():
                raise OutputError(f"{plot}: is a file; --plot names a folder to draw in")
            _check_writable(plot)
            _check_outside_data(plot, data, "--plot")
        checkpoint = checkpoint or default_checkpoint()
        verifier = Verifier.from_checkpoint(checkpoint, device)
        with _progress_bar() as update:
            images = load_evaluation_set(data, mirror, progress=update, skip_bad_images=skip_bad_images)
        lake = load_lake_runs(runs) if runs is not None else None
        # drawn before the images are embedded: a --way or --shot the data cannot give is refused at once
        pair_list = fixed_pairs(images, pairs, seed, within_group=design.within_group)
        sampled = sample_episodes(images, way, shot, trials, seed)
        with _progress_bar() as update:
            embeddings = embed_pixels(verifier.model, images.pixels, verifier.device, progress=update)
        logits = pair_logits(verifier.model, embeddings, pair_list)
        verification = pair_metrics(logits, pair_list.same, verifier.threshold)
        episodes = one_shot_accuracy(verifier.model, embeddings, sampled)
        official = lake_runs_accuracy(verifier.model, lake, verifier.device) if lake is not None else None
        if plot is not None:
            import torch

            from .evaluate import episode_logits
            from .figures import roc_figure, trials_figure

            alphabets = _counted(len(images.group_names), "alphabet")
            title = f"Verification ROC: {verification.pairs} pairs of {alphabets}\ndifferent pairs: {design.label}"
            drawn = [
                roc_figure(torch.sigmoid(logits), pair_list.same, verifier.threshold, plot / "roc.png", title),
                trials_figure(images, sampled, episode_logits(verifier.model, embeddings, sampled),
                              plot / "hardest_trials.png"),
            ]
            for path in drawn:
                err.print(f"wrote {path}", markup=False, highlight=False)
        report = {
            "checkpoint": str(checkpoint),
            "verification": verification.to_dict() | {"negatives": design.label},
            "one_shot": episodes.to_dict() | {"seed": seed},
            "lake_runs": official.to_dict() if official else None,
        }
        if as_json:
            _print_json(report)
            return
        where = f"{_counted(images.num_classes, 'class')} in {_counted(len(images.group_names), 'group')}"
        table = Table(title=f"{escape(str(checkpoint))} on {where}")
        for column in ("protocol", "trials", "accuracy", "95% interval / other"):
            table.add_column(column)
        table.add_row(
            f"verification pairs ({design.label}, threshold {verification.threshold:.4f})", str(verification.pairs),
            f"{verification.accuracy:.2%}", f"ROC AUC {verification.roc_auc:.4f}, EER {verification.eer:.2%}",
        )
        for result in filter(None, (episodes, official)):
            table.add_row(
                f"{result.protocol}, {result.way}-way {result.shot}-shot", str(result.trials),
                f"{result.accuracy:.2%}", f"{result.ci_low:.2%} – {result.ci_high:.2%}",
            )
        out.print(table)


@app.command()
def compare(
    first: Annotated[Path, typer.Argument(metavar="FIRST", help="First image (any format and size Pillow reads)")],
    second: Annotated[Path, typer.Argument(metavar="SECOND", help="Second image")],
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Draw both images side by side with the score and decision into this PNG "
                     "file; needs matplotlib"),
    ] = None,
) -> None:
    """Say whether two images show the same character: score, SAME/DIFFERENT and the threshold."""
    _setup_logging()
    with _errors_as_exit():
        from .verify import Verifier, default_checkpoint

        if plot is not None:
            _require_plotting()
            from .figures import check_png_name

            _check_writable(check_png_name(plot).parent)
            if plot.exists() and any(image.exists() and plot.samefile(image) for image in (first, second)):
                raise OutputError(f"{plot}: is an image being compared; --plot must name another file")
        verifier = Verifier.from_checkpoint(checkpoint or default_checkpoint(), device)
        result = verifier.compare(first, second)
        if plot is not None:
            from .figures import compare_figure

            first_pixels, second_pixels = verifier.pixels([first, second]).numpy()
            compare_figure(first_pixels, second_pixels, result, plot, names=(first.name, second.name))
            err.print(f"wrote {plot}", markup=False, highlight=False)
        if as_json:
            _print_json(result.to_dict())
            return
        verdict = "[green]SAME[/green]" if result.same else "[yellow]DIFFERENT[/yellow]"
        out.print(f"{verdict}  score {result.score:.4f}  (threshold {result.threshold:.4f})", highlight=False)


@app.command()
def classify(
    queries: Annotated[
        list[Path],
        typer.Argument(metavar="QUERY", help="Images to recognise (any format and size Pillow reads)",
                       show_default=False),
    ],
    support: Annotated[
        Path,
        typer.Option("--support", "-s", help="Support folder: one folder of images per class (<class>/<image>), "
                     "or one image per class (<class>.png)"),
    ],
    checkpoint: CheckpointOption = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes to list per query")] = 5,
    cache: Annotated[
        bool,
        typer.Option("--cache/--no-cache", help="Reuse the support embeddings cached in <support>/.siamese-cache/ "
                     "(keyed by the model and the images), and write them there"),
    ] = True,
    device: DeviceOption = "auto",
    skip_bad_images: SkipBadImagesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Recognise each image among the classes of a support folder: the top classes with their scores."""
    _setup_logging()
    with _errors_as_exit():
        from .verify import Verifier, default_checkpoint

        checkpoint = checkpoint or default_checkpoint()
        verifier = Verifier.from_checkpoint(checkpoint, device)
        gallery = verifier.load_support(support, cache=cache, skip_bad_images=skip_bad_images)
        results = verifier.classify(queries, gallery, top_k=top_k)
        how = "read from" if gallery.from_cache else "embedded, cached in" if gallery.cache_path else "embedded"
        where = f" {gallery.cache_path}" if gallery.cache_path else ""
        err.print(f"support {support}: {_counted(gallery.num_classes, 'class')}, {_counted(len(gallery), 'image')} "
                  f"({how}{where})",
                  markup=False, highlight=False)
        if as_json:
            report = {
                "checkpoint": str(checkpoint),
                "support": {"folder": str(support), "classes": gallery.num_classes, "images": len(gallery),
                            "cache": str(gallery.cache_path) if gallery.cache_path else None,
                            "from_cache": gallery.from_cache},
                "threshold": verifier.threshold,
                "results": [result.to_dict() for result in results],
            }
            _print_json(report)
            return
        width = max(len(m.class_name) for result in results for m in result.matches)
        for result in results:
            out.print(result.query, markup=False, highlight=False)
            for rank, match in enumerate(result.matches, 1):
                verdict = "  [green]SAME[/green]" if match.same else ""
                out.print(f"  {rank:>2}. {escape(match.class_name.ljust(width))}  {match.score:.4f}{verdict}",
                          highlight=False)


@app.command()
def export(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder to write embedding.onnx and scorer.onnx to (replaced if present)")
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Argument(metavar="CHECKPOINT", help="Checkpoint to export \\[default: the bundled fast model]",
                       show_default=False),
    ] = None,
    export_format: Annotated[str, typer.Option("--format", help="Export format; only onnx for now")] = "onnx",
    opset: Annotated[int, typer.Option("--opset", min=9, help="ONNX opset version")] = 17,
    as_json: JsonOption = False,
) -> None:
    """Export the embedding network and the pair scorer as ONNX, checked against PyTorch with onnxruntime."""
    _setup_logging()
    with _errors_as_exit():
        from .export import export_onnx
        from .verify import Verifier, default_checkpoint

        if export_format.lower() != "onnx":
            raise ConfigError(f"unknown export format {export_format!r}: only onnx is supported")
        checkpoint = checkpoint or default_checkpoint()
        result = export_onnx(Verifier.from_checkpoint(checkpoint, "cpu"), out_dir, opset=opset)
        if as_json:
            _print_json({"checkpoint": str(checkpoint)} | result.to_dict())
            return
        dim = result.embedding_dim
        batches = " and ".join(map(str, result.check_batches))
        for line in (
            f"embedding: {result.embedding_path}  (pixels uint8 [batch, 105, 105] → embeddings float32 [batch, {dim}])",
            f"scorer:    {result.scorer_path}  (first, second float32 [batch, {dim}] → logits, scores float32 [batch]; "
            f"same when scores ≥ {result.threshold:.4f})",
            f"onnxruntime vs PyTorch (float32, batches of {batches}): max abs difference {result.max_abs_diff:.2e} "
            f"(embeddings {result.embedding_max_abs_diff:.2e}, scores {result.scorer_max_abs_diff:.2e}; "
            f"limit {result.tolerance:.0e})",
        ):
            out.print(line, markup=False, highlight=False)


def _time_left(seconds: float) -> str:
    """``about 2 h 05 min left``, ``about 7 min left``, ``under a minute left``."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left" if minutes >= 60 else f"about {minutes} min left"


def _counted(number: int, noun: str) -> str:
    """``1 class``, ``2 classes``, ``1 image``, ``3 images``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}{'es' if noun.endswith('s') else 's'}"


def _one_of(name: str, value, reference_name: str, reference_value):
    """The value of an option given as ``name`` or in the reference's spelling ``reference_name``, not both."""
    if value is not None and reference_value is not None:
        raise ConfigError(f"{name} and {reference_name} are one option; give it once")
    return value if value is not None else reference_value


def _check_outside_data(folder: Path, data: Path | None, option: str) -> None:
    """Refuse an output folder inside the data's image folders, where its files would be read as images next time
    (a hidden folder there is never read)."""
    from .data.omniglot import image_folders

    target = folder.resolve()
    for images in image_folders(data):
        root = images.resolve()
        if target.is_relative_to(root) and not any(part.startswith(".") for part in target.relative_to(root).parts):
            raise OutputError(f"{folder}: is inside the data tree {images}, whose next load would read its files as "
                              f"images; choose {option} outside it")


def _require_plotting() -> None:
    """Fail before any work when --plot cannot be honoured."""
    from .figures import require_matplotlib

    require_matplotlib()


def main() -> None:
    """Run the command line (the console script does, from :mod:`siamese_omniglot.__main__`, once it has loaded)."""
    app()
