#!/usr/bin/env python3
"""Does a user's own `streamtag train` generalise to a device recorded 20 dB quieter?

    .venv/bin/python recipes/user_levels.py runs/recipe runs/user_levels

Takes the ESC-10 classes of the recipe's source-grouped ESC-50 split (``recipes/default_model.py``) and
writes the training clips again at mixed levels, as a user's recordings come: each source recording
(group) at one gain drawn from 0 to -10 dB. Then train and evaluate as a user would; the held-out clips
are played at their own level and 20 and 30 dB quieter, 10 to 30 dB below the quietest recording (training's
gain augmentation, -45..+6 dB, covers those levels; what is tested is a device unlike the recordings).
Without ``--no-val`` the trainer holds out a grouped fifth of the clips to pick the best epoch:

    streamtag train runs/user_levels/train.csv --out runs/user_levels/model --epochs 60
    streamtag eval runs/user_levels/model runs/recipe/esc10_test.csv --levels 0,-20,-30 --baseline-folds 0

(``--level-seconds 0`` trains the same model without the level normaliser, for comparison.)
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

GAIN_DB = (-10.0, 0.0)
SEED = 0


def main(recipe: Path, out: Path) -> None:
    with open(recipe / "esc10_test.csv", newline="") as f:
        classes = {r["label"] for r in csv.DictReader(f)}
    with open(recipe / "esc50_train.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in classes]
    rng = random.Random(SEED)
    gains = {g: rng.uniform(*GAIN_DB) for g in sorted({r["group"] for r in rows})}
    (out / "audio").mkdir(parents=True, exist_ok=True)
    with open(out / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group", "gain_db"])
        w.writeheader()
        for r in rows:
            audio, rate = sf.read(r["path"], dtype="float32", always_2d=False)
            gain = gains[r["group"]]
            target = out / "audio" / Path(r["path"]).name
            sf.write(target, np.clip(audio * 10 ** (gain / 20), -1.0, 1.0), rate, subtype="PCM_16")
            w.writerow(
                {"path": str(target.resolve()), "label": r["label"], "group": r["group"], "gain_db": f"{gain:.1f}"}
            )
    print(f"{len(rows)} training clips of {len(classes)} classes from {len(gains)} recordings, at {GAIN_DB} dB: {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    except (OSError, sf.LibsndfileError) as exc:  # a wrong recipe folder or an unreadable clip: one line
        sys.exit(f"user_levels: error: {exc} (run recipes/default_model.py first; see the docstring)")
