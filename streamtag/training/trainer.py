"""Train a causal model on labelled clips with frame-wise loss, so it is right early in a sound.

The model is trained on whole crops with its offline ``forward`` (the same code
path as streaming), the loss on every frame after a short warm-up. Augmentation
works on log-mel, in the power domain where sounds add: random gain, random crop,
another clip mixed in as background, mixup (mixed labels) and SpecAugment masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import FeatureConfig, ModelConfig
from ..errors import ConfigError, ModelFileError
from ..models import build_model
from ..models.io import save_model
from .datasets import Dataset, compute_features

CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass
class TrainOptions:
    arch: str = "cnn"
    arch_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 80
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    crop_s: float = 3.0
    warmup_s: float = 0.25
    gain_db: float = 6.0
    background_p: float = 0.5
    mixup_p: float = 0.3
    spec_masks: int = 2
    seed: int = 0
    device: str = "cpu"
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be >= 1")
        if not self.crop_s > self.warmup_s:
            raise ConfigError(f"crop ({self.crop_s} s) must be longer than the warm-up ({self.warmup_s} s)")


def clip_scores(model, feats: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    """Frame probabilities ``(frames, classes)`` per clip, by the offline forward (== streaming)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for x in feats:
            t = torch.from_numpy(x)[None].to(device)
            logits, _ = model(t, model.init_state(1))
            out.append(torch.softmax(logits[0], -1).cpu().numpy())
    return out


def accuracies(probs: list[np.ndarray], targets: np.ndarray) -> dict[str, float]:
    last = np.array([p[-1].argmax() for p in probs])
    mean = np.array([p.mean(0).argmax() for p in probs])
    return {"acc_last": float((last == targets).mean()), "acc_mean": float((mean == targets).mean())}


class _Batches:
    """Augmented training batches of fixed-length crops."""

    def __init__(
        self,
        feats: list[np.ndarray],
        targets: np.ndarray,
        n_classes: int,
        opts: TrainOptions,
        floor: float,
        rng: np.random.Generator,
    ) -> None:
        self.feats, self.targets, self.n_classes, self.opts, self.rng = feats, targets, n_classes, opts, rng
        self.crop = int(round(opts.crop_s / opts.features.frame_seconds))
        self.floor = floor
        counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
        weights = 1.0 / counts[targets]
        self.p = weights / weights.sum()  # class-balanced sampling

    def _crop(self, i: int) -> np.ndarray:
        x = self.feats[i]
        if x.shape[0] <= self.crop:
            out = np.full((self.crop, x.shape[1]), self.floor, dtype=np.float32)
            start = self.rng.integers(0, self.crop - x.shape[0] + 1)
            out[start : start + x.shape[0]] = x
            return out
        start = self.rng.integers(0, x.shape[0] - self.crop + 1)
        return x[start : start + self.crop]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        o, rng, b = self.opts, self.rng, self.opts.batch_size
        idx = rng.choice(len(self.feats), size=b, p=self.p)
        x = np.stack([self._crop(i) for i in idx])
        y = np.eye(self.n_classes, dtype=np.float32)[self.targets[idx]]
        x += (rng.uniform(-o.gain_db, o.gain_db, size=(b, 1, 1)) * math.log(10) / 10).astype(np.float32)
        for j in range(b):
            if rng.random() < o.mixup_p:  # mixup in the power domain, labels mixed too
                k = rng.choice(len(self.feats), p=self.p)
                lam = float(rng.uniform(0.3, 0.7))
                x[j] = np.logaddexp(x[j] + math.log(lam), self._crop(k) + math.log(1 - lam))
                y[j] = lam * y[j] + (1 - lam) * np.eye(self.n_classes, dtype=np.float32)[self.targets[k]]
            elif rng.random() < o.background_p:  # quiet background, label unchanged
                k = rng.choice(len(self.feats))
                gain_db = rng.uniform(-25.0, -10.0)
                x[j] = np.logaddexp(x[j], self._crop(k) + gain_db * math.log(10) / 10)
            for _ in range(o.spec_masks):  # SpecAugment: a band and a stretch of time set to silence
                f0, fw = rng.integers(0, x.shape[2]), rng.integers(0, 8)
                x[j, :, f0 : f0 + fw] = self.floor
                t0, tw = rng.integers(0, x.shape[1]), rng.integers(0, 25)
                x[j, t0 : t0 + tw] = self.floor
        return torch.from_numpy(x), torch.from_numpy(y)


def train(
    dataset: Dataset,
    train_idx,
    val_idx,
    opts: TrainOptions,
    out_dir: str | Path,
    cache: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log=print,
    keep_best: bool = True,
) -> dict[str, Any]:
    """Train and save a model folder in ``out_dir``: the epoch best on validation when ``keep_best`` and there
    is a validation set, else the last epoch (cross-validation must not pick epochs on its test fold)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    feats = compute_features(dataset, opts.features, cache)
    targets = dataset.targets()
    train_feats = [feats[i] for i in train_idx]
    val_feats = [feats[i] for i in val_idx]
    cfg = ModelConfig(opts.arch, tuple(dataset.labels), opts.features, dict(opts.arch_params))
    model = build_model(cfg).to(opts.device)
    stacked = np.concatenate(train_feats)
    model.feat_mean.copy_(torch.from_numpy(stacked.mean(0)))
    model.feat_std.copy_(torch.from_numpy(stacked.std(0) + 1e-3))
    floor = float(math.log(opts.features.log_floor))
    batches = _Batches(train_feats, targets[train_idx], len(dataset.labels), opts, floor, rng)
    steps = max(1, math.ceil(len(train_idx) / opts.batch_size))
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=opts.epochs * steps)
    warm = int(round(opts.warmup_s / opts.features.frame_seconds))
    history: list[dict[str, Any]] = []
    best = {"score": -1.0}
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if resume:
        start_epoch, history, best = _load_checkpoint(ckpt_path, model, optim, sched, rng, opts.epochs)
    bar = _progress(progress)
    task = bar.add_task("training", total=steps) if bar else None
    t_start = time.time()
    try:
        for epoch in range(start_epoch, opts.epochs):
            model.train()
            total = 0.0
            if bar:
                bar.reset(task, total=steps, description=f"epoch {epoch + 1}/{opts.epochs}")
            for _ in range(steps):
                x, y = batches.batch()
                x, y = x.to(opts.device), y.to(opts.device)
                logits, _ = model(x, model.init_state(x.shape[0]))
                logp = F.log_softmax(logits[:, warm:], dim=-1)
                loss = -(y[:, None, :] * logp).sum(-1).mean()
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optim.step()
                sched.step()
                total += loss.item()
                if bar:
                    bar.update(task, advance=1)
            row = {"epoch": epoch + 1, "loss": total / steps, "seconds": round(time.time() - t_start, 1)}
            if len(val_idx):
                row.update(accuracies(clip_scores(model, val_feats, opts.device), targets[val_idx]))
            score = row["acc_mean"] + row["acc_last"] if keep_best and len(val_idx) else float(epoch)
            history.append(row)
            if score > best["score"]:
                best = {"score": score, **row}
                save_model(model.cpu(), cfg, out_dir)
                model.to(opts.device)
            if bar:  # one lasting line per epoch above the bar, which restarts for the next epoch
                val = f"  val {row['acc_mean']:.1%} mean, {row['acc_last']:.1%} last frame" if "acc_mean" in row else ""
                bar.console.print(f"epoch {epoch + 1}/{opts.epochs}  loss {row['loss']:.3f}{val}")
            log(json.dumps(row))
            _save_checkpoint(ckpt_path, epoch + 1, model, optim, sched, rng, history, best, opts.epochs)
    finally:
        if bar:
            bar.stop()
    (out_dir / "train_log.json").write_text(
        json.dumps({"options": dataclasses.asdict(opts), "history": history, "best": best}, indent=1)
    )
    return {"best": best, "history": history}


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False)
    bar.start()
    return bar


def _save_checkpoint(path: Path, epoch, model, optim, sched, rng, history, best, total_epochs: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "epoch": epoch,
            "epochs": total_epochs,
            "model": model.state_dict(),
            "optim": optim.state_dict(),
            "sched": sched.state_dict(),
            "rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(history),
            "best": json.dumps(best),
        },
        tmp,
    )
    tmp.replace(path)


def _load_checkpoint(path: Path, model, optim, sched, rng, total_epochs: int):
    if not path.is_file():
        raise ModelFileError(f"nothing to resume: {path} does not exist (drop --resume to start fresh)")
    try:
        ckpt = torch.load(path, weights_only=True)  # never unpickles code
        if ckpt["epochs"] != total_epochs:
            raise ConfigError(
                f"{path} belongs to a run of --epochs {ckpt['epochs']}; resume with the same --epochs "
                "(the learning-rate schedule depends on it)"
            )
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        sched.load_state_dict(ckpt["sched"])
    except ConfigError:
        raise
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise ModelFileError(f"{path} is not a checkpoint this run can resume ({str(exc).splitlines()[0]})") from None
    rng.bit_generator.state = json.loads(ckpt["rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["epoch"], json.loads(ckpt["history"]), json.loads(ckpt["best"])
