"""Evaluation through the streaming path, with an offline baseline for honesty.

Every clip is replayed through the ring, worker and backend exactly as
``streamtag replay --fast`` would run it; the frame probabilities collected
there give clip accuracy (last frame, mean over frames), macro mAP, per-class
accuracy, a confusion matrix and the time-to-detect curve (accuracy using only
the first N seconds heard).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DETECT_AFTER_S = (0.25, 0.5, 1.0, 2.0, 5.0)


def stream_scores(backend, paths: Sequence[os.PathLike]) -> list[np.ndarray]:
    """Frame probabilities ``(frames, classes)`` per file, through ring + worker + backend."""
    from ..pipeline import tag_file

    return [tag_file(backend, path).probs for path in paths]


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    if positive.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision * hits).sum() / hits.sum())


def metrics(probs: list[np.ndarray], targets: np.ndarray, labels: Sequence[str], frame_seconds: float) -> dict:
    n_classes = len(labels)
    mean = np.stack([p.mean(0) for p in probs])
    last = np.stack([p[-1] for p in probs])
    pred_mean, pred_last = mean.argmax(1), last.argmax(1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (targets, pred_last), 1)
    aps = [average_precision(mean[:, c], targets == c) for c in range(n_classes)]
    per_class = {}
    for c, label in enumerate(labels):
        mask = targets == c
        if mask.any():
            per_class[label] = {"n": int(mask.sum()), "acc_last": float((pred_last[mask] == c).mean()), "ap": aps[c]}
    ttd = {}
    for seconds in DETECT_AFTER_S:
        frame = max(1, int(round(seconds / frame_seconds)))
        preds = np.array([p[min(frame, len(p)) - 1].argmax() for p in probs])
        ttd[f"{seconds:g}"] = float((preds == targets).mean())
    return {
        "clips": len(probs),
        "acc_last": float((pred_last == targets).mean()),
        "acc_mean": float((pred_mean == targets).mean()),
        "macro_map": float(np.nanmean(aps)),
        "time_to_detect": ttd,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }


def clip_statistics(feats: list[np.ndarray]) -> np.ndarray:
    """Per-band mean and standard deviation of each clip's log-mel: the baseline's input."""
    return np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in feats]).astype(np.float32)


def baseline_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, n_classes: int, l2: float = 1e-3
) -> float:
    """Multinomial logistic regression (L-BFGS, L2) on clip statistics; accuracy on the test clips."""
    import torch

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt = torch.from_numpy((train_x - mu) / sd)
    yt = torch.from_numpy(train_y)
    w = torch.zeros(xt.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (torch.from_numpy((test_x - mu) / sd) @ w + b).argmax(1).numpy()
    return float((pred == test_y).mean())


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, plot: bool = False) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(markdown(report))
    if plot:
        plot_report(report, out_dir)
    return out_dir


def markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = [f"# Evaluation: {report.get('model', '')} on {report.get('dataset', '')}", ""]
    lines += [
        f"- clips: {m['clips']}",
        f"- accuracy, last frame: {m['acc_last']:.1%}",
        f"- accuracy, mean over frames: {m['acc_mean']:.1%}",
        f"- macro mAP: {m['macro_map']:.3f}",
    ]
    if "baseline_acc" in report:
        lines.append(
            f"- baseline (logistic regression on clip mean+std of log-mel, {report['baseline_split']}): "
            f"{report['baseline_acc']:.1%}"
        )
    lines += ["", "## Time to detect", "", "| audio heard (s) | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in m["time_to_detect"].items()]
    lines += ["", "## Per class", "", "| class | clips | accuracy (last frame) | AP |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['acc_last']:.1%} | {v['ap']:.3f} |" for k, v in m["per_class"].items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["metrics"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [float(k) for k in m["time_to_detect"]]
    ax.plot(xs, list(m["time_to_detect"].values()), "o-", label="streaming model")
    if "baseline_acc" in report:
        ax.axhline(report["baseline_acc"], color="grey", ls="--", label="offline baseline (whole clip)")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("audio heard (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("time to detect")
    fig.tight_layout()
    fig.savefig(out_dir / "time_to_detect.png", dpi=110)
    plt.close(fig)
    conf = np.array(m["confusion"], dtype=np.float64)
    conf = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = max(5, 0.18 * len(m["labels"]))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(conf, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(m["labels"])), m["labels"], rotation=90, fontsize=6)
    ax.set_yticks(range(len(m["labels"])), m["labels"], fontsize=6)
    ax.set_xlabel("predicted (last frame)")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=110)
    plt.close(fig)
