"""Evaluation speed: wall time of the installed ``siamese eval`` command, start-up and data loading included.

Runs the command ``--repeats`` times after one untimed run (which builds the image cache when it is missing)
and reports the median.

    python benchmarks/eval_speed.py --data /path/to/omniglot --trials 2000 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date

from results_table import insert_row


def siamese_command() -> list[str]:
    """The installed console script, else the module run by this interpreter."""
    script = shutil.which("siamese")
    return [script] if script else [sys.executable, "-m", "siamese_omniglot"]


def timed_run(command: list[str]) -> tuple[float, dict]:
    """Seconds for one run of ``command`` (which prints JSON), and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds, json.loads(done.stdout)


def results_row(report: dict, command: str) -> str:
    """One row of the evaluation-speed table of docs/results.md."""
    one_shot = report["one_shot"]
    return (
        f"| {date.today().isoformat()} | {report['checkpoint']} | {report['device']}, {report['machine']} "
        f"| {one_shot['trials']:,} × {one_shot['way']}-way + {report['pairs']:,} pairs "
        f"| **{report['seconds']:.1f} s** | {one_shot['accuracy']:.1%} | `{command}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: the bundled model)")
    parser.add_argument("--data", default=None, help="data root (default: $SIAMESE_DATA or ./datasets)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=2000, help="one-shot trials")
    parser.add_argument("--way", type=int, default=20, help="candidates per one-shot trial")
    parser.add_argument("--pairs", type=int, default=1000, help="same and different verification pairs each")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--results", default="", help="docs/results.md to add a row to (default: none)")
    args = parser.parse_args()

    command = [*siamese_command(), "eval", *([args.checkpoint] if args.checkpoint else [])]
    command += ["--device", args.device, "--trials", str(args.trials), "--way", str(args.way), "--pairs",
                str(args.pairs), "--json"]
    if args.data:
        command += ["--data", args.data]
    timed_run(command)  # warm-up: the image cache, the file system cache
    runs = [timed_run(command) for _ in range(args.repeats)]
    report = {
        "checkpoint": args.checkpoint or "bundled `fast`",
        "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "pairs": 2 * args.pairs,
        "seconds": statistics.median(seconds for seconds, _ in runs),
        "all_seconds": [seconds for seconds, _ in runs],
        "one_shot": runs[0][1]["one_shot"],
    }
    if args.results:
        insert_row(args.results, "## Evaluation speed", results_row(report, "python " + shlex.join(sys.argv)))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"siamese eval: {report['seconds']:.1f} s (median of {args.repeats}; {report['all_seconds']})")


if __name__ == "__main__":
    main()
