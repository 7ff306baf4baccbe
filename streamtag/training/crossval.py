"""Source-grouped cross-validation: a fold's recordings are never on both sides; figures pooled over folds."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .datasets import Dataset, compute_features, grouped_folds
from .evaluate import baseline_accuracy, clip_statistics, metrics, stream_scores
from .trainer import TrainOptions, train


def _one_fold(job):
    """Train and evaluate one fold (runs in a worker process)."""
    import torch

    from ..backends import make_backend

    dataset, train_idx, val_idx, opts, out, cache, threads, teacher, label_map = job
    torch.set_num_threads(threads)
    train(
        dataset,
        train_idx,
        val_idx,
        opts,
        out,
        cache,
        progress=False,
        log=lambda line: None,
        keep_best=False,
        teacher=teacher,
        label_map=label_map,
    )
    backend = make_backend("onnx", out)
    targets = dataset.targets()
    train_idx, val_idx = train_idx[targets[train_idx] >= 0], val_idx[targets[val_idx] >= 0]  # labelled clips
    probs = stream_scores(backend, [dataset.clips[i].path for i in val_idx])
    hard = dataset.hard_targets()[val_idx]  # a clip with several labels is right on any of them, as in eval
    m = metrics(probs, targets[val_idx], dataset.labels, opts.features.frame_seconds, hard=hard)
    stats = clip_statistics(compute_features(dataset, opts.features, cache))
    base = baseline_accuracy(
        stats[train_idx], targets[train_idx], stats[val_idx], targets[val_idx], len(dataset.labels)
    )
    return {"metrics": m, "baseline_acc": base}


def cross_validate(
    dataset: Dataset,
    opts: TrainOptions,
    out: str | os.PathLike,
    cache: Path | None,
    k: int,
    seed: int = 0,
    jobs: int = 1,
    threads: int = 1,
    teacher=None,
    label_map=None,
) -> dict[str, Any]:
    """Train on ``k - 1`` source-grouped folds and evaluate through the streaming path on the held-out one,
    for every fold (``jobs`` at a time); the report pools the folds, with the offline baseline beside it.
    Each fold's model is kept in ``out/fold<k>``."""
    groups = len({c.group for c in dataset.clips if c.label})
    if not 2 <= k <= groups:  # else a fold has no clip to test on, found only after every fold has trained
        raise ConfigError(
            f"--cv {k}: K-fold cross-validation needs 2 <= K <= {groups}, the number of source recordings "
            "(groups) of labelled clips here"
        )
    compute_features(dataset, opts.features, cache)  # fill the cache once, before the workers start
    folds = grouped_folds(dataset, k, seed)
    idx = np.arange(len(dataset.clips))
    work = [
        (
            dataset,
            idx[folds != f],
            idx[folds == f],
            opts,
            Path(out) / f"fold{f}",
            cache,
            threads,
            teacher,
            label_map,
        )
        for f in range(k)
    ]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_one_fold, work))
    else:
        results = [_one_fold(w) for w in work]
    n = np.array([r["metrics"]["clips"] for r in results], dtype=np.float64)

    def pooled(get):
        return float((np.array([get(r) for r in results]) * n).sum() / n.sum())

    m0 = results[0]["metrics"]
    summary = {
        "clips": int(n.sum()),
        "acc_last": pooled(lambda r: r["metrics"]["acc_last"]),
        "acc_mean": pooled(lambda r: r["metrics"]["acc_mean"]),
        "macro_map": float(np.mean([r["metrics"]["macro_map"] for r in results])),
        "time_to_detect": {k: pooled(lambda r, k=k: r["metrics"]["time_to_detect"][k]) for k in m0["time_to_detect"]},
        "per_class": {},
        "confusion": np.sum([r["metrics"]["confusion"] for r in results], axis=0).tolist(),
        "labels": m0["labels"],
    }
    for label in dataset.labels:
        rows = [r["metrics"]["per_class"][label] for r in results if label in r["metrics"]["per_class"]]
        if rows:
            total = sum(x["n"] for x in rows)
            summary["per_class"][label] = {
                "n": total,
                "acc_last": sum(x["acc_last"] * x["n"] for x in rows) / total,
                "ap": float(np.nanmean([x["ap"] for x in rows])),
            }
    return {
        "model": f"{opts.arch} ({k}-fold grouped CV)",
        "metrics": summary,
        "baseline_acc": pooled(lambda r: r["baseline_acc"]),
        "baseline_split": "same folds",
        "folds": [
            {
                "baseline_acc": r["baseline_acc"],
                "acc_last": r["metrics"]["acc_last"],
                "acc_mean": r["metrics"]["acc_mean"],
            }
            for r in results
        ],
    }
