#!/usr/bin/env python3
"""What ``train --init default`` gains on a label set of a user's own: the manifests of the README's figure.

usage: python recipes/transfer_check.py SHARED OUT

SHARED is this project's shared material (``../shared``: its ``data/urbansound8k`` holds the clips with a
``manifest.csv`` and a ``provenance.csv`` naming each clip's UrbanSound8K fold), OUT a folder for the manifests.

UrbanSound8K's fold 10 (which the bundled model never trained on) under new names (``u_dog_bark``, ...: no
output row of the bundled model comes over, only what its network learned), split in two source-grouped
halves: OUT/train.csv and OUT/test.csv. Then, in OUT:

    streamtag train train.csv --out scratch --epochs 15 --no-val --quiet \\
        --arch-param front_channels=[8,16] --arch-param pool_seconds=[0.5,3.0] --arch-param pool_gate=true
    streamtag train train.csv --out init --init default --epochs 15 --no-val --quiet
    streamtag eval scratch test.csv --levels 0 --baseline-folds 0 --report r_scratch
    streamtag eval init test.csv --levels 0 --baseline-folds 0 --report r_init

(the same network both ways: the bundled model's architecture parameters, which --init brings).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from streamtag.training.datasets import grouped_folds, load_dataset

SEED = 0


def main(shared: Path, out: Path) -> None:
    root = shared / "data" / "urbansound8k"
    with open(root / "manifest.csv", newline="") as f:
        stored = {Path(r["path"]).stem: r["path"] for r in csv.DictReader(f)}
    with open(root / "provenance.csv", newline="") as f:
        fold10 = [r for r in csv.DictReader(f) if r["us8k_fold"] == "10"]
    rows = [
        {"path": str(root / stored[Path(r["path"]).stem]), "label": f"u_{r['label']}", "group": r["group"]}
        for r in fold10
    ]
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "all.csv", rows)
    halves = grouped_folds(load_dataset(out / "all.csv"), 2, SEED)
    for name, half in (("train", 0), ("test", 1)):
        _write(out / f"{name}.csv", [r for r, h in zip(rows, halves) if h == half])
        print(f"{out / name}.csv: {int((halves == half).sum())} clips")


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
