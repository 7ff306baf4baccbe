"""``streamtag eval MODEL DATASET``: accuracy, mAP and time to detect through the streaming path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .run import BACKENDS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on labelled audio through the streaming path",
        description="Replay every clip of DATASET through the ring buffer, worker and backend, and report clip "
        "accuracy (last frame and mean over frames), macro mAP, per-class accuracy, a confusion matrix "
        "and a time-to-detect curve, beside an offline logistic-regression baseline.",
    )
    p.add_argument("model", help="model folder, or 'default' for the bundled model")
    p.add_argument("dataset", help="ESC-50 folder, folder per class, or CSV manifest")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="onnx")
    p.add_argument("--report", metavar="DIR", default="eval_report", help="where report.json/.md go")
    p.add_argument("--plot", action="store_true", help="also save confusion.png and time_to_detect.png")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N clips (a quick look)")
    p.add_argument(
        "--baseline-folds",
        type=int,
        default=5,
        metavar="K",
        help="the baseline is scored by K-fold source-grouped CV on the same clips (default 5)",
    )
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..backends import make_backend
    from ..modelfile import cache_dir
    from ..training.datasets import compute_features, grouped_folds, load_dataset
    from ..training.evaluate import baseline_accuracy, clip_statistics, metrics, stream_scores, write_report

    backend = make_backend(args.backend, None if args.model == "default" else args.model)
    dataset = load_dataset(args.dataset)
    if args.limit:
        dataset = dataset.subset(range(min(args.limit, len(dataset.clips))))
    known = set(backend.labels)
    unknown = sorted({c.label for c in dataset.clips} - known)
    if unknown:
        print(
            f"streamtag eval: warning: {len(unknown)} dataset classes are not model classes and count as "
            f"errors: {unknown[:5]}",
            file=sys.stderr,
        )
    index = {label: i for i, label in enumerate(backend.labels)}
    targets = np.array([index.get(c.label, -1) for c in dataset.clips])
    probs = stream_scores(backend, [c.path for c in dataset.clips])
    report = {
        "model": args.model,
        "dataset": str(args.dataset),
        "metrics": metrics(probs, targets, backend.labels, backend.config.features.frame_seconds),
    }
    k = args.baseline_folds
    if k >= 2 and len(dataset.clips) >= 2 * k:
        stats = clip_statistics(compute_features(dataset, backend.config.features, cache_dir() / "features"))
        folds = grouped_folds(dataset, k)
        correct = 0.0
        for f in range(k):
            tr, te = folds != f, folds == f
            if te.any() and tr.any():
                correct += (
                    baseline_accuracy(stats[tr], targets[tr], stats[te], targets[te], len(backend.labels)) * te.sum()
                )
        report["baseline_acc"] = correct / len(dataset.clips)
        report["baseline_split"] = f"{k}-fold source-grouped CV on these clips"
    out = write_report(report, args.report, args.plot)
    print((Path(out) / "report.md").read_text())
    return 0
