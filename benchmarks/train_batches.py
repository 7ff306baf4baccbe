#!/usr/bin/env python
"""How fast training batches are made: what a GPU run waits for (docs/MODEL.md, "Trained on a GPU").

On a GPU the model's step takes milliseconds and the CPU's batch tens of them, so crops per second
per core bounds what a lent GPU can learn in its minutes. A batch is drawn (clips picked, crops cut,
targets and random choices made: ``_Batches.draw``) and then augmented (``_Batches.augment``: mixing,
reverberation, noise, gain, masks as whole-batch tensor operations). This times both on the CPU in one
process, and the augmentation on the GPU when there is one (a GPU run's batch workers only draw), on a
training pack (``recipes/train_pack.py pack``) or on synthetic clips with random teacher windows when
none is given; milliseconds per batch and crops per second, the best of three repeats.

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
    import torch

    torch.set_num_threads(1)  # per core, as a batch worker runs
    batches = batches_of(prepared, opts, np.random.default_rng(0))
    plans = [batches.draw() for _ in range(args.batches)]

    def best_of_three(work) -> float:  # seconds a batch
        work()
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            work()
            best = min(best, (time.perf_counter() - start) / args.batches)
        return best

    def on(device: str):
        def work():
            for plan in plans:
                x, _, _ = batches.augment(plan, device)
            x.sum().item()  # wait for the device

        return work

    times = {
        "draw": best_of_three(lambda: [batches.draw() for _ in range(args.batches)]),
        "augment_cpu": best_of_three(on("cpu")),
    }
    if torch.cuda.is_available():
        times["augment_cuda"] = best_of_three(on("cuda"))
    b = opts.batch_size
    report = {
        "data": str(args.pack) if args.pack else "synthetic",
        "batch_size": b,
        "ms_per_batch": {k: round(v * 1000, 2) for k, v in times.items()},
        "crops_per_second_per_core": {
            "cpu": round(b / (times["draw"] + times["augment_cpu"])),  # a CPU run's worker: draws and augments
            "drawing_only": round(b / times["draw"]),  # a GPU run's worker
        },
    }
    for k, v in times.items():
        print(f"{k}: {v * 1000:.2f} ms a batch of {b}")
    print(f"crops a second a core: {report['crops_per_second_per_core']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
