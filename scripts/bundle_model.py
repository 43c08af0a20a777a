"""Make the bundled model: a training checkpoint without its training state, inside the package.

    python scripts/bundle_model.py logs/bench-accuracy/best.pt --command "python benchmarks/accuracy.py …"

Writes ``siamese_omniglot/weights/fast.pt`` (weights, model config, threshold, training settings, validation
metrics, and the command that trained it), which `siamese compare`, `eval`, `classify` and `export` use when no
checkpoint is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import siamese_omniglot as so

TARGET = Path(__file__).resolve().parents[1] / "siamese_omniglot" / "weights" / "fast.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="best.pt of a training run of the fast preset")
    parser.add_argument("--command", required=True, help="the command that trained it (recorded in the file)")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    state = so.load_checkpoint(args.checkpoint)
    kept = {key: value for key, value in state.items() if key not in ("training", "format_version", "preprocessing")}
    kept["trained_by"] = args.command
    so.save_checkpoint(kept, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
