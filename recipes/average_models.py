#!/usr/bin/env python3
"""Average the weights of several trained models of one architecture into one model (a "model soup").

usage: python recipes/average_models.py OUT MODEL MODEL [MODEL ...]

Stages fine-tuned from one starting model stay close enough in weight space that their average is a
model of its own, often better than each of them and never slower: the same network, one set of weights
(Wortsman et al., "Model soups", ICML 2022). The bundled model is the average of three: one stage and two
trained from it with other seeds and target rules (docs/MODEL.md); each stage traded some figures for
others, and the average kept most of the gains of each.

Every model must have the same config.json (architecture, features and labels), except that a CNN
deepened with `train --init` may be averaged with the model it grew from (see average_models).
Batch-norm running statistics are averaged too, which is only close to what the averaged network computes: one epoch of
`streamtag train ... --init OUT --epochs 1 --lr 1e-9` measures them again with the weights unchanged.
OUT gets config.json, model.safetensors, trained_on.txt (every model's training clips) and train_log.json
(the models and their own training logs); event settings are the first model's, to be calibrated again
(recipes/calibrate_events.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from streamtag.errors import StreamtagError
from streamtag.events import MODEL_EVENTS_NAME
from streamtag.modelfile import CONFIG_NAME
from streamtag.models.io import load_model, save_model
from streamtag.training.datasets import TRAINED_ON, learned_clips


def average_models(folders: list[Path], out: Path) -> Path:
    """Write the average of the models in ``folders`` to ``out``; a config that differs is one error line.

    One difference is allowed: a CNN deepened with ``train --init`` (conv blocks appended) may be averaged
    with the shallower model it grew from. The shallower one counts as having those blocks doing nothing
    (batch-norm scale and shift 0), so each appended block's output is scaled by the share of models that
    have it, and the average lies on the line between the models' functions, as it does for equal configs.
    """
    if len(folders) < 2:
        raise StreamtagError("give at least two models to average")
    loaded = [load_model(folder) for folder in folders]
    deepest = max(range(len(loaded)), key=lambda i: len(getattr(loaded[i][1], "dilations", ())))
    first_cfg, model = loaded[deepest]
    for folder, (cfg, other) in zip(folders, loaded):
        if _without_dilations(cfg) != _without_dilations(first_cfg) or not _is_prefix(other, model):
            raise StreamtagError(
                f"{folder / CONFIG_NAME} differs from {folders[deepest] / CONFIG_NAME}: only models of one "
                "architecture, feature set and label list (or a CNN and the deeper one grown from it) can be averaged"
            )
    states = [other.state_dict() for _, other in loaded]
    averaged = {}
    for name, reference in model.state_dict().items():
        have = [s[name] for s in states if name in s]
        if not reference.is_floating_point():  # counters (batches seen by a batch norm): the first model's
            averaged[name] = have[0]
        elif name.startswith("norms.") and name.endswith((".weight", ".bias")):  # absent: a block doing nothing
            averaged[name] = torch.stack(have).sum(dim=0) / len(states)
        else:
            averaged[name] = torch.stack(have).mean(dim=0)
    model.load_state_dict(averaged)
    save_model(model, first_cfg, out)
    clips = set()
    for folder in folders:
        clips |= learned_clips(folder)  # its own run's and its --init model's
    (out / TRAINED_ON).write_text("".join(f"{c}\n" for c in sorted(clips)))
    logs = {str(f): json.loads((f / "train_log.json").read_text()) for f in folders if (f / "train_log.json").is_file()}
    log = {"averaged": [str(f) for f in folders], "their_logs": logs}
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if (folders[0] / MODEL_EVENTS_NAME).is_file():
        shutil.copyfile(folders[0] / MODEL_EVENTS_NAME, out / MODEL_EVENTS_NAME)
    return out


def _without_dilations(cfg):
    return dataclasses.replace(cfg, arch_params={k: v for k, v in cfg.arch_params.items() if k != "dilations"})


def _is_prefix(shallow, deep) -> bool:
    """``shallow``'s conv blocks are the first of ``deep``'s (the same model when neither is a CNN)."""
    mine, theirs = getattr(shallow, "dilations", ()), getattr(deep, "dilations", ())
    return tuple(theirs[: len(mine)]) == tuple(mine)


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
