"""A worker for ``torch.distributed.run`` in the distributed tests.

``ddp_worker.py train …`` runs the real ``siamese train`` command line; ``ddp_worker.py api CONFIG_JSON DATA OUT``
runs the Trainer directly, and ``… OUT SNAPSHOT`` pauses it after 3 steps and saves a snapshot there. Either way,
each rank then writes what the tests compare to ``$SIAMESE_TEST_DUMP/rank<R>.pt``: its final parameters and how many
checkpoints it saved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import siamese_omniglot as so
from siamese_omniglot import __main__ as console_script
from siamese_omniglot import train

saves: list[str] = []
_save = train.save_checkpoint


def _counting_save(state, path):
    saves.append(str(path))
    return _save(state, path)


def _dump(trainer: so.Trainer) -> None:
    params = {name: value.detach().cpu() for name, value in trainer.objective.named_parameters()}
    path = Path(os.environ["SIAMESE_TEST_DUMP"]) / f"rank{trainer.dist.rank}.pt"
    torch.save({"params": params, "saves": len(saves)}, path)


_fit = train.Trainer.fit


def _fit_and_dump(self, resume=None, **options):
    result = _fit(self, resume, **options)
    _dump(self)
    return result


train.save_checkpoint = _counting_save
train.Trainer.fit = _fit_and_dump

if __name__ == "__main__":
    if sys.argv[1] == "api":
        from siamese_omniglot.distributed import init_distributed, shutdown

        config = so.TrainConfig(**json.loads(sys.argv[2]))
        context, device = init_distributed("cpu")
        images = so.load_training_set(sys.argv[3])
        trainer = so.Trainer(config, images, sys.argv[4], device, dist=context)
        if len(sys.argv) > 5:
            trainer.fit(stop_after=3)
            trainer.save_snapshot(sys.argv[5])
            _dump(trainer)
        else:
            trainer.fit()
        shutdown(context)
    else:
        sys.argv = ["siamese", *sys.argv[1:]]
        console_script.main()
