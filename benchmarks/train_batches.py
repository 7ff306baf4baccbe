#!/usr/bin/env python
"""How fast training batches are made: what a GPU run waits for (docs/MODEL.md, "Trained on a GPU").

On a GPU the model's step takes milliseconds and the CPU's augmentation of a batch tens of them, so
crops per second per core bounds what a lent GPU can learn in its minutes. This times
``_Batches.batch`` in one process on a training pack (``recipes/train_pack.py pack``), or on synthetic
clips with random teacher windows when none is given, and prints milliseconds per batch and crops per
second; the best of three repeats.

    python benchmarks/train_batches.py [PACK.npz] [--batches 20] [--out results/train_batches.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


def _synthetic():
    from streamtag.training.teacher import Teacher
    from streamtag.training.trainer import Prepared, TrainOptions

    rng = np.random.default_rng(0)
    classes, n = 57, 400
    feats = [rng.normal(-8.0, 3.0, size=(int(rng.integers(200, 1500)), 64)).astype(np.float32) for _ in range(n)]
    hard = np.full((n, classes), np.nan, np.float32)
    hard[: n // 2] = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n // 2)]
    windows = []
    for x in feats:
        ends = np.arange(1.0, len(x) / 100 + 0.5, 0.5)
        windows.append({"ends": ends, "scores": rng.random((len(ends), 527)).astype(np.float16)})
    mapping = [rng.choice(527, size=int(rng.integers(1, 4)), replace=False) for _ in range(classes - 3)] + [
        np.array([], dtype=np.int64)
    ] * 3

    mapped = [Teacher.map_windows(w, mapping) for w in windows]  # once per clip, as the trainer does

    def soft(i: int, first: int, count: int) -> np.ndarray:
        return Teacher.frames(windows[i]["ends"], mapped[i], count, 0.01, first)

    groups = [f"g{i % 20}" for i in range(n)]
    prepared = Prepared([f"c{i}" for i in range(classes)], [], feats, hard, soft, groups, [1.0] * n)
    return prepared, TrainOptions(quiet_lead_p=0.3, band_limit_p=0.5, unmapped_negatives=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pack", nargs="?", type=Path, help="a training pack (default: synthetic clips)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_batches.json")
    args = p.parse_args()
    from streamtag.training.trainer import batches_of

    if args.pack:
        from train_pack import load

        prepared, opts = load(args.pack, {})
    else:
        prepared, opts = _synthetic()
    batches = batches_of(prepared, opts, np.random.default_rng(0))
    batches.batch()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(args.batches):
            batches.batch()
        best = min(best, (time.perf_counter() - start) / args.batches)
    report = {
        "data": str(args.pack) if args.pack else "synthetic",
        "batch_size": opts.batch_size,
        "ms_per_batch": round(best * 1000, 2),
        "crops_per_second_per_core": round(opts.batch_size / best),
    }
    print(f"{report['ms_per_batch']} ms a batch of {opts.batch_size}: {report['crops_per_second_per_core']} crops/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
