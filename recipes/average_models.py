#!/usr/bin/env python3
"""Average the weights of several trained models of one architecture into one model (a "model soup").

usage: python recipes/average_models.py OUT MODEL MODEL [MODEL ...]

Stages fine-tuned from one starting model stay close enough in weight space that their average is a
model of its own, often better than each of them and never slower: the same network, one set of weights
(Wortsman et al., "Model soups", ICML 2022). The bundled model is the average of three: one stage and two
trained from it with other seeds and target rules (docs/MODEL.md); each stage traded some figures for
others, and the average kept most of the gains of each.

Every model must have the same config.json (architecture, features and labels). Batch-norm running
statistics are averaged too, which is only close to what the averaged network computes: one epoch of
`streamtag train ... --init OUT --epochs 1 --lr 1e-9` measures them again with the weights unchanged.
OUT gets config.json, model.safetensors, trained_on.txt (every model's training clips) and train_log.json
(the models and their own training logs); event settings are the first model's, to be calibrated again
(recipes/calibrate_events.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from streamtag.errors import StreamtagError
from streamtag.events import MODEL_EVENTS_NAME
from streamtag.modelfile import CONFIG_NAME
from streamtag.models.io import load_model, save_model
from streamtag.training.datasets import TRAINED_ON


def average_models(folders: list[Path], out: Path) -> Path:
    """Write the average of the models in ``folders`` to ``out``; a config that differs is one error line."""
    if len(folders) < 2:
        raise StreamtagError("give at least two models to average")
    first_cfg, model = load_model(folders[0])
    states = [model.state_dict()]
    for folder in folders[1:]:
        cfg, other = load_model(folder)
        if cfg != first_cfg:
            raise StreamtagError(
                f"{folder / CONFIG_NAME} differs from {folders[0] / CONFIG_NAME}: "
                "only models of one architecture, feature set and label list can be averaged"
            )
        states.append(other.state_dict())
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            averaged[name] = torch.stack([s[name] for s in states]).mean(dim=0)
        else:  # counters (batches seen by a batch norm): the first model's
            averaged[name] = first
    model.load_state_dict(averaged)
    save_model(model, first_cfg, out)
    clips = set()
    for folder in folders:
        if (folder / TRAINED_ON).is_file():
            clips.update(line for line in (folder / TRAINED_ON).read_text().splitlines() if line)
    (out / TRAINED_ON).write_text("".join(f"{c}\n" for c in sorted(clips)))
    logs = {str(f): json.loads((f / "train_log.json").read_text()) for f in folders if (f / "train_log.json").is_file()}
    log = {"averaged": [str(f) for f in folders], "their_logs": logs}
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if (folders[0] / MODEL_EVENTS_NAME).is_file():
        shutil.copyfile(folders[0] / MODEL_EVENTS_NAME, out / MODEL_EVENTS_NAME)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    out = average_models([Path(a) for a in argv[1:]], Path(argv[0]))
    print(f"averaged {len(argv) - 1} models into {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (StreamtagError, OSError) as exc:
        sys.exit(f"average_models: error: {exc}")
