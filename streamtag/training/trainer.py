"""Train a causal model on labelled clips (and unlabelled audio with a teacher), loss on every frame.

The model is trained on whole crops with its offline ``forward`` (the same code
path as streaming), the loss on every frame after a short warm-up, so it is right
early in a sound. Targets are per frame and per class: a clip's label (1), the other
classes its dataset knows it lacks (0), and where a teacher is given its soft scores
(mixed in where the label is known, alone where it is not); entries nobody knows are
left out of the loss.

Augmentation works on log-mel, in the power domain where sounds add: a second
recording mixed under the first at a random signal-to-noise ratio (targets are the
union while the second is loud enough to be heard, so the model learns polyphony and
backgrounds; further under, its classes are left out of the loss), a reverberation tail, a
microphone noise floor, a wide random gain (the level normaliser must see quiet
input), and SpecAugment masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OUTPUTS, FeatureConfig, ModelConfig
from ..errors import ConfigError, ModelFileError, StreamtagError, count, some
from ..features.functional import mel_filterbank
from ..modelfile import CHUNK_NAME, ONNX_NAME
from ..models import build_model
from ..models.io import save_model
from ..models.level import white_noise_bands
from ..models.step import probabilities
from .augment import DB, Plan, augment
from .datasets import INHERITED, TRAINED_ON, Dataset, clip_identity, compute_features, learned_clips, trained_on
from .evaluate import correct

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
    output: str = "sigmoid"
    level_seconds: float = 3.0  # the model's level normaliser (0: none); arch_params may override
    gain_db: tuple[float, float] = (-45.0, 6.0)
    background_p: float = 0.5
    snr_db: tuple[float, float] = (0.0, 25.0)
    # a recording mixed further under than this may be masked: its classes are then left out of the loss, not
    # taught as heard (a dog 25 dB under music taught as "dog" makes a model call music dog)
    audible_snr_db: float = 12.0
    reverb_p: float = 0.3
    noise_floor_p: float = 0.5
    noise_floor_db: tuple[float, float] = (-100.0, -65.0)
    unlabelled_p: float = 0.25
    silence_p: float = 0.03
    teacher_weight: float = 0.5
    spec_masks: int = 2
    # a stream's level estimate has usually settled on what came before a sound (a quiet room, a louder
    # street): this share of crops starts with the estimate settled that many dB from the crop's own level
    warm_level_p: float = 0.5
    warm_level_db: tuple[float, float] = (-50.0, 10.0)
    # a live stream meets a sound after seconds of a quiet room, which fill the model's running means and
    # level estimate; this share of crops starts with a quiet floor (every target 0) before the sound
    quiet_lead_p: float = 0.0
    quiet_lead_s: tuple[float, float] = (0.5, 2.0)
    # a share of crops with nothing above a cutoff (telephone, 8 kHz recorders, codecs): a dataset recorded that
    # way (Donate-a-cry is 8 kHz) must not teach that a missing top octave is its class
    band_limit_p: float = 0.2
    band_limit_hz: tuple[float, float] = (3400.0, 7000.0)
    # a class the teacher has no counterpart for (can_opening) gets targets from its labelled clips alone, so
    # nothing teaches it absent on speech or music: with this, it is taught absent (0) wherever a clip says
    # nothing of it and the teacher hears one of the mapped classes (a sound accounted for by something else)
    unmapped_negatives: bool = False
    # a clip's label is weak: a 5 s dog clip is barks and silence. > 0: its own class is taught as 1 on the frames
    # within this many dB of its loudest (give or take 0.1 s), not blended with the teacher, and quieter frames take
    # the teacher's word alone; 0: the label on every frame, blended (before 2026-12-02)
    label_frames_db: float = 0.0
    init_from: str | None = None  # a trained model folder to start from (fine-tuning)
    steps_per_epoch: int = 0  # 0: one pass over the training clips
    seed: int = 0
    device: str = "cpu"
    loader_workers: int = 0  # processes drawing batches (BatchMaker); 0: the training process
    # a floor 30 dB below 16-bit quantisation noise: quiet input stays above it, so gain stays a pure shift
    features: FeatureConfig = dataclasses.field(default_factory=lambda: FeatureConfig(log_floor=1e-9))

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number ({self.lr} given)")
        if not self.crop_s > self.warmup_s:
            raise ConfigError(f"crop ({self.crop_s} s) must be longer than the warm-up ({self.warmup_s} s)")
        if self.output not in OUTPUTS:
            raise ConfigError(f"--output must be one of {', '.join(OUTPUTS)} ({self.output!r} given)")
        if not 0.0 <= self.warm_level_p <= 1.0:
            raise ConfigError(f"--warm-level must be in 0..1 ({self.warm_level_p} given)")
        if not 0.0 <= self.quiet_lead_p <= 1.0:
            raise ConfigError(f"--quiet-lead must be in 0..1 ({self.quiet_lead_p} given)")
        if not 0.0 <= self.band_limit_p <= 1.0:
            raise ConfigError(f"--band-limit must be in 0..1 ({self.band_limit_p} given)")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ConfigError(f"--teacher-weight must be in 0..1 ({self.teacher_weight} given)")
        if not (math.isfinite(self.label_frames_db) and self.label_frames_db >= 0):
            raise ConfigError(
                f"--label-frames must be 0 (off) or a positive number of dB ({self.label_frames_db} given)"
            )

    def model_config(self, labels) -> ModelConfig:
        params = dict(self.arch_params)
        if self.level_seconds and "level_seconds" not in params:
            params["level_seconds"] = self.level_seconds
        return ModelConfig(self.arch, tuple(labels), self.features, params, self.output)


def clip_scores(model, feats: list[np.ndarray], cfg: ModelConfig, device: str = "cpu") -> list[np.ndarray]:
    """Frame probabilities ``(frames, classes)`` per clip, by the offline forward (== streaming)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for x in feats:
            t = torch.from_numpy(np.asarray(x, dtype=np.float32))[None].to(device)
            logits, _ = model(t, model.init_state(1))
            out.append(probabilities(logits[0], cfg).cpu().numpy())
    return out


def accuracies(
    probs: list[np.ndarray], targets: np.ndarray, allowed: np.ndarray | None = None, hard: np.ndarray | None = None
) -> dict[str, float]:
    """Clip accuracy by the last frame and by the mean over frames; ``allowed`` (clips, classes) restricts
    each clip's argmax to the classes its dataset can name (the standard protocol for a benchmark set);
    ``hard`` (clips, classes): a clip with several labels is right on any of them, as in eval."""
    offset = np.zeros((len(probs), 1)) if allowed is None else np.where(allowed, 0.0, -np.inf)
    last = np.array([(p[-1] + offset[i]).argmax() for i, p in enumerate(probs)])
    mean = np.array([(p.mean(0) + offset[i]).argmax() for i, p in enumerate(probs)])
    return {
        "acc_last": float(correct(last, targets, hard).mean()),
        "acc_mean": float(correct(mean, targets, hard).mean()),
    }


@dataclasses.dataclass
class _Crop:
    x: np.ndarray  # (frames, n_mels) log-mel
    y: np.ndarray  # (frames, classes) targets, NaN unknown


class _Batches:
    """Augmented training batches of fixed-length crops with frame targets."""

    def __init__(
        self,
        feats: list[np.ndarray],
        hard: np.ndarray,
        soft,
        opts: TrainOptions,
        floor: float,
        rng: np.random.Generator,
        noise_bands: np.ndarray,
        groups: list[str] | None = None,
        weights: list[float] | None = None,
    ) -> None:
        self.feats, self.hard, self.soft, self.opts, self.rng = feats, hard, soft, opts, rng
        self._loud: dict[int, np.ndarray] = {}  # clip -> its frames within label_frames_db of its loudest
        self.crop = int(round(opts.crop_s / opts.features.frame_seconds))
        self.floor = floor
        self.noise_bands = noise_bands  # log power per band of white noise at 0 dBFS
        labelled = np.nan_to_num(hard, nan=0.0).max(1) > 0
        cls = np.where(labelled, np.nan_to_num(hard, nan=0.0).argmax(1), -1)
        counts = np.bincount(cls[labelled], minlength=hard.shape[1]).astype(np.float64)
        w = np.where(labelled, 1.0 / np.maximum(counts[np.maximum(cls, 0)], 1), 0.0)
        self.p_labelled = w / w.sum() if w.sum() else None  # class-balanced sampling
        self.unlabelled = np.flatnonzero(~labelled)
        # unlabelled audio is drawn group by group (a package of a corpus), then a file: a package of many
        # short files does not crowd out one of a few long ones; a group of weight w is drawn w times as often
        self.unlabelled_groups = _by_group(groups, self.unlabelled) if groups is not None else [self.unlabelled]
        w_group = np.array([1.0 if weights is None or not g.size else weights[g[0]] for g in self.unlabelled_groups])
        self.p_group = None if np.all(w_group == 1.0) else w_group / w_group.sum()  # None: uniform, as before
        self.n_classes = hard.shape[1]
        self.frame_s = opts.features.frame_seconds
        self.settled_frames = 1.0  # the level normaliser's time constant in frames; set by train()
        f = opts.features  # each mel band's peak frequency, Hz
        self.band_centres = mel_filterbank(f).argmax(0).numpy() * (f.sample_rate / f.win_length)

    def _pick(self) -> int:
        o, rng = self.opts, self.rng
        if self.p_labelled is None or (self.unlabelled.size and rng.random() < o.unlabelled_p):
            return self._pick_unlabelled()
        return int(rng.choice(len(self.feats), p=self.p_labelled))

    def _pick_unlabelled(self) -> int:
        n = len(self.unlabelled_groups)
        g = self.rng.integers(n) if self.p_group is None else self.rng.choice(n, p=self.p_group)
        members = self.unlabelled_groups[int(g)]
        return int(self.rng.choice(members))

    def _crop(self, i: int) -> _Crop:
        x = self.feats[i]
        n, c = self.crop, self.n_classes
        if x.shape[0] <= n:  # short clip: placed at random in silence
            start = int(self.rng.integers(0, n - x.shape[0] + 1))
            src, dst = slice(0, x.shape[0]), slice(start, start + x.shape[0])
            out = np.full((n, x.shape[1]), self.floor, dtype=np.float32)
            y = np.full((n, c), np.nan, dtype=np.float32)
            y[:start] = 0.0  # before the sound starts nothing is heard
            first = 0
        else:
            first = int(self.rng.integers(0, x.shape[0] - n + 1))
            src, dst = slice(first, first + n), slice(0, n)
            out = np.empty((n, x.shape[1]), dtype=np.float32)
            y = np.empty((n, c), dtype=np.float32)
        out[dst] = x[src]
        frames = dst.stop - dst.start
        target = np.broadcast_to(self.hard[i], (frames, c)).copy()
        own = (self.hard[i] == 1) if self.opts.label_frames_db > 0 else np.zeros(c, bool)
        if own.any():
            loud = self._loud_frames(i)[src]
            target[np.ix_(~loud, own)] = np.nan  # the label does not say which frames hold the sound
        if self.soft is not None:
            soft = self.soft(i, first, frames)
            if soft is not None:
                w = self.opts.teacher_weight
                both = ~np.isnan(target) & ~np.isnan(soft)
                target[both] = (1 - w) * target[both] + w * soft[both]
                target = np.where(np.isnan(target), soft, target)
                if self.opts.unmapped_negatives:
                    unmapped = np.isnan(soft).all(axis=0)  # the teacher gives no class without a counterpart a score
                    heard = np.nan_to_num(soft, nan=0.0).max(1, keepdims=True) >= 0.5  # teacher: a mapped class
                    absent = np.isnan(target) & unmapped & ~own & heard  # never the clip's own label
                    target = np.where(absent, np.float32(0.0), target)
        if own.any():
            target[np.ix_(loud, own)] = 1.0  # where the sound is, the label is the truth
        y[dst] = target
        if dst.stop < n:
            y[dst.stop :] = target[-1]  # after the clip: what was last heard (the head's running means hold it)
        return _Crop(out, y)

    def _loud_frames(self, i: int) -> np.ndarray:
        """Frames of clip ``i`` within ``label_frames_db`` of its loudest frame, widened by 0.1 s each way."""
        if i not in self._loud:
            power = np.logaddexp.reduce(self.feats[i], axis=1)  # each frame's log power over all bands
            loud = power >= power.max() - self.opts.label_frames_db * DB
            pad = max(1, int(round(0.1 / self.frame_s)))
            padded = np.pad(loud, pad)
            self._loud[i] = np.lib.stride_tricks.sliding_window_view(padded, 2 * pad + 1).any(axis=1)
        return self._loud[i]

    def _mix_targets(self, y: np.ndarray, under: np.ndarray, snr_db: float) -> np.ndarray:
        """Targets of a crop with a recording mixed ``snr_db`` under it: a class either holds is heard, unless
        the quieter one is further under than ``audible_snr_db`` (then its classes are unknown, not heard)."""
        if snr_db > self.opts.audible_snr_db:  # what the quieter one holds may be masked: unknown, not heard
            under = np.where(under >= 0.2, np.float32(np.nan), under)
        both = np.fmax(y, under)  # a class either recording holds is heard
        known = (~np.isnan(y) & ~np.isnan(under)) | (both >= 0.5)
        return np.where(known, both, np.nan).astype(np.float32)

    def draw(self) -> Plan:
        """A batch's crops, targets and random choices (:class:`~streamtag.training.augment.Plan`); cheap, on
        the CPU. :meth:`augment` makes it a batch, on the training device."""
        o, rng, b = self.opts, self.rng, self.opts.batch_size
        frames, bands = self.crop, self.feats[0].shape[1]
        plan = Plan.empty(b, frames, bands, self.n_classes, o.spec_masks)
        mixed, under, snrs = [], [], []
        for k in range(b):
            if rng.random() < o.silence_p:
                plan.x[k], plan.y[k] = self.floor, 0.0
            else:
                item = self._crop(self._pick())
                plan.x[k], plan.y[k] = item.x, item.y
            if rng.random() < o.background_p:  # half the time a recording without labels (music, speech, noise)
                use_unlabelled = self.unlabelled.size and rng.random() < 0.5
                other = self._crop(self._pick_unlabelled() if use_unlabelled else int(rng.integers(len(self.feats))))
                snr = rng.uniform(*o.snr_db)
                plan.y[k] = self._mix_targets(plan.y[k], other.y, snr)
                mixed.append(k)
                under.append(other.x)
                snrs.append(snr)
            if rng.random() < o.band_limit_p:  # nothing above a random cutoff (telephone, 8 kHz recorders)
                plan.cut[k] = int(np.searchsorted(self.band_centres, rng.uniform(*o.band_limit_hz)))
            if rng.random() < o.reverb_p:
                plan.rt60[k], plan.wet_db[k] = rng.uniform(0.2, 1.2), rng.uniform(-12, 0)
            if rng.random() < o.noise_floor_p:  # a microphone's self-noise: white to pink, at a random level
                plan.noise_db[k], plan.tilt[k] = rng.uniform(*o.noise_floor_db), rng.uniform(0.0, 1.0)
            plan.gain_db[k] = rng.uniform(*o.gain_db)
            if rng.random() < o.quiet_lead_p:
                lead = min(int(rng.uniform(*o.quiet_lead_s) / self.frame_s), frames // 2)
                plan.lead[k] = lead
                plan.lead_noise_db[k], plan.lead_tilt[k] = rng.uniform(*o.noise_floor_db), rng.uniform(0.0, 1.0)
                plan.y[k] = np.concatenate([np.zeros_like(plan.y[k, :lead]), plan.y[k, : frames - lead]])
            elif rng.random() < o.warm_level_p:
                plan.warm_db[k] = rng.uniform(*o.warm_level_db)
            for m in range(o.spec_masks):
                f0, fw = rng.integers(0, bands), rng.integers(0, 8)  # a band
                t0, tw = rng.integers(0, frames), rng.integers(0, 25)  # and a stretch of time
                plan.masks[k, m] = f0, fw, t0, tw
        if mixed:
            plan.mixed, plan.under, plan.snr_db = np.array(mixed), np.stack(under), np.array(snrs)
        plan.seed = int(rng.integers(2**63))
        return plan

    def augment(self, plan: Plan, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, level0)`` of a drawn batch, on ``device`` (:func:`~streamtag.training.augment.augment`)."""
        return augment(plan, self.floor, self.noise_bands, self.frame_s, self.settled_frames, device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, level0)``: features, targets and each crop's starting level-estimate state
        ``(level, frames counted)``; zeros (a fresh stream) or settled ``warm_level_db`` off the crop's level.
        Drawn and augmented here, on the CPU."""
        return self.augment(self.draw())


def _by_group(groups: list[str], members: np.ndarray) -> list[np.ndarray]:
    out: dict[str, list[int]] = {}
    for i in members:
        out.setdefault(groups[i], []).append(int(i))
    return [np.array(v) for v in out.values()] or [members]


def frame_loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool, rank_weight: float = 0.2) -> torch.Tensor:
    """Loss over the frames and classes whose target is known (NaN entries are left out).

    Multi-label: binary cross-entropy per class, plus ``rank_weight`` times a cross-entropy over
    the known classes of each frame that holds a sound (a target >= 0.5). BCE alone spreads the
    push of one positive over every class; the ranking term makes the labelled class beat the
    classes its dataset rules out, which is what a few thousand steps on CPU can learn.
    """
    known = ~torch.isnan(y)
    target = torch.nan_to_num(y, nan=0.0)
    if multi_label:
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce = (loss * known).sum() / known.sum().clamp(min=1)
        if not rank_weight:
            return bce
        return bce + rank_weight * _ranked_ce(logits.masked_fill(~known, -1e4), target)
    return _ranked_ce(logits, target)


def _ranked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the targets normalised to sum 1, on frames whose largest target is >= 0.5."""
    rows = target.amax(-1) >= 0.5
    if not rows.any():
        return logits.sum() * 0.0
    dist = target[rows] / target[rows].sum(-1, keepdim=True)
    return -(dist * F.log_softmax(logits[rows], dim=-1)).sum(-1).mean()


@dataclasses.dataclass
class Prepared:
    """What the training loop reads, the audio already turned into features and targets: :func:`train` makes
    it from a dataset; ``recipes/train_pack.py`` carries it to a machine without the audio (a GPU box)."""

    labels: list[str]
    clips: list[str]  # identities of the training clips (written to trained_on.txt, checked by --resume)
    feats: list[np.ndarray]  # (frames, n_mels) log-mel of each training clip
    hard: np.ndarray  # (clips, classes) labels: 1, 0 or NaN (unknown)
    soft: Callable[[int, int, int], np.ndarray | None] | None  # teacher targets of training clip i, or None
    groups: list[str]
    weights: list[float]
    val_feats: list[np.ndarray] = dataclasses.field(default_factory=list)  # labelled validation clips
    val_targets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    val_hard: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))


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
    teacher=None,
    label_map=None,
) -> dict[str, Any]:
    """Train and save a model folder in ``out_dir``: the epoch best on validation when ``keep_best`` and there
    is a validation set, else the last epoch (cross-validation must not pick epochs on its test fold).
    ``teacher`` (:class:`~streamtag.training.teacher.Teacher`) with ``label_map`` adds soft targets."""
    checkpoint = None
    if resume:  # before any work: a checkpoint continued on other classes or clips gives a model of neither
        checkpoint = _check_same_run(Path(out_dir) / CHECKPOINT, dataset.labels, training_clips(dataset, train_idx))
    prepared = prepare(dataset, train_idx, val_idx, opts, cache, teacher, label_map)
    return fit(prepared, opts, out_dir, checkpoint, progress, log, keep_best)


def training_clips(dataset: Dataset, train_idx) -> list[str]:
    return sorted({clip_identity(dataset.clips[i].path) for i in train_idx})


def prepare(
    dataset: Dataset, train_idx, val_idx, opts: TrainOptions, cache: Path | None = None, teacher=None, label_map=None
) -> Prepared:
    """Features (cached) and targets of the training and validation clips."""
    feats = compute_features(dataset, opts.features, cache)
    targets = dataset.targets()
    hard = dataset.hard_targets()
    soft = _soft_targets(dataset, opts, teacher, label_map)
    train_idx, val_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64)
    _check_every_class_is_taught(dataset.labels, hard[train_idx], teacher, label_map)
    val_labelled = val_idx[targets[val_idx] >= 0] if len(val_idx) else val_idx
    return Prepared(
        labels=list(dataset.labels),
        clips=training_clips(dataset, train_idx),
        feats=[feats[i] for i in train_idx],
        hard=hard[train_idx],
        soft=None if soft is None else (lambda i, first, n: soft(int(train_idx[i]), first, n)),
        groups=[dataset.clips[i].group for i in train_idx],
        weights=[dataset.clips[i].weight for i in train_idx],
        val_feats=[feats[i] for i in val_labelled],
        val_targets=targets[val_labelled],
        val_hard=hard[val_labelled],
    )


def fit(
    data: Prepared,
    opts: TrainOptions,
    out_dir: str | Path,
    checkpoint: dict | None = None,
    progress: bool = True,
    log=print,
    keep_best: bool = True,
) -> dict[str, Any]:
    """The training loop over prepared data; ``checkpoint`` (read by :func:`_check_same_run`) resumes a run."""
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    cfg = opts.model_config(data.labels)
    model = build_model(cfg).to(opts.device)
    _set_feature_statistics(model, data.feats)
    if opts.init_from:  # before anything is written: an --init that does not fit leaves no folder behind
        note = _start_from(model, cfg, opts.init_from)
        if note:  # on stderr whatever --quiet says: which classes start untrained is not progress
            print(note, file=sys.stderr, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # written with the weights, so the two always go together (a run stopped before its first save left the old
    # weights beside this run's list); a fine-tuned model has learned from its --init model's clips too
    inherited = sorted(learned_clips(opts.init_from) - set(data.clips)) if opts.init_from else []
    listed = "\n".join(data.clips + ([INHERITED, *inherited] if inherited else [])) + "\n"
    batches = batches_of(data, opts, rng)
    if model.level is not None:
        batches.settled_frames = float(model.level.frames)
    steps = opts.steps_per_epoch or max(1, math.ceil(len(data.feats) / opts.batch_size))
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=opts.epochs * steps)
    warm = int(round(opts.warmup_s / opts.features.frame_seconds))
    validating = len(data.val_feats) > 0
    allowed = ~np.isnan(data.val_hard) if validating else None
    history: list[dict[str, Any]] = []
    best = {"score": -1.0}
    start_epoch = 0
    if checkpoint is not None:
        start_epoch, history, best = _load_checkpoint(ckpt_path, checkpoint, model, optim, sched, rng, opts.epochs)
        if start_epoch >= opts.epochs:  # it went through an empty loop and saved the same model again
            raise ConfigError(
                f"--resume: the run in {out_dir} finished all its {opts.epochs} epochs; nothing is left to train. To "
                f"train it further, start a new run from it: --init {out_dir} --out NEW_FOLDER"
            )
    bar = _progress(progress)
    task = bar.add_task("training", total=steps) if bar else None
    t_start = time.time()
    try:
        with BatchMaker(batches, opts.loader_workers, opts.device) as maker:
            for epoch in range(start_epoch, opts.epochs):
                model.train()
                total = 0.0
                if bar:
                    bar.reset(task, total=steps, description=f"epoch {epoch + 1}/{opts.epochs}")
                for batch in maker.epoch(opts.seed, epoch, steps):
                    total += training_step(model, optim, batch, cfg, warm, opts.device)
                    sched.step()
                    if bar:
                        bar.update(task, advance=1)
                row = {"epoch": epoch + 1, "loss": total / steps, "seconds": round(time.time() - t_start, 1)}
                if validating:
                    probs = clip_scores(model, data.val_feats, cfg, opts.device)
                    row.update(accuracies(probs, data.val_targets, allowed, data.val_hard))
                score = row["acc_mean"] + row["acc_last"] if keep_best and validating else float(epoch)
                history.append(row)
                if score > best["score"]:
                    best = {"score": score, **row}
                    save_model(model.cpu(), cfg, out_dir)
                    (out_dir / TRAINED_ON).write_text(listed)
                    for stale in (ONNX_NAME, CHUNK_NAME):  # graphs exported from earlier weights no longer match
                        (out_dir / stale).unlink(missing_ok=True)
                    model.to(opts.device)
                if bar:  # one lasting line per epoch above the bar, which restarts for the next epoch
                    val = f"  val {row['acc_mean']:.1%} mean, {row['acc_last']:.1%} last frame" if validating else ""
                    bar.console.print(f"epoch {epoch + 1}/{opts.epochs}  loss {row['loss']:.3f}{val}")
                log(json.dumps(row))
                _save_checkpoint(
                    ckpt_path, epoch + 1, model, optim, sched, rng, history, best, opts.epochs, data.labels, data.clips
                )
    finally:
        if bar:
            bar.stop()
    (out_dir / "train_log.json").write_text(
        json.dumps({"options": dataclasses.asdict(opts), "history": history, "best": best}, indent=1)
    )
    return {"best": best, "history": history}


def batches_of(data: Prepared, opts: TrainOptions, rng: np.random.Generator) -> _Batches:
    """The augmented batches of a run over ``data``."""
    bands = np.log(white_noise_bands(opts.features).numpy()).astype(np.float32)
    floor = float(math.log(opts.features.log_floor))
    return _Batches(data.feats, data.hard, data.soft, opts, floor, rng, bands, data.groups, data.weights)


def training_step(model, optim, batch, cfg: ModelConfig, warm: int, device: str) -> float:
    """One update on one batch ``(x, y, level0)``; returns its loss (waiting for the device, as a run does)."""
    x, y, level0 = batch
    x, y = x.to(device), y.to(device)
    state = model.init_state(x.shape[0])
    if model.level is not None:  # the level's state is the last entry
        state = state[:-1] + (level0.to(device),)
    logits, _ = model(x, state)
    loss = frame_loss(logits[:, warm:], y[:, warm:], cfg.multi_label)
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optim.step()
    return loss.item()


class BatchMaker:
    """Augmented batches for an epoch, drawn in this process (``workers`` 0) or by that many forked processes.

    On a GPU the model's step takes a few milliseconds and one core's batch tens of them, so the batches are
    what a run waits for. Training on a GPU (``device`` not the CPU), the workers only draw batches and the
    augmentation runs on the GPU in this process, where it takes about as long as the step; on the CPU each
    worker augments what it draws. With workers, batch ``step`` of ``epoch`` is drawn from its own generator
    seeded by ``(seed, epoch, step)``: the same batches whatever the number of workers (on one device: a GPU's
    noise generator is not the CPU's), and a resumed run draws what the uninterrupted one would have. Without
    workers the run's one generator draws them in turn, as before workers existed.
    """

    def __init__(self, batches: _Batches, workers: int = 0, device: str = "cpu") -> None:
        self.batches, self.workers, self.device, self._pool = batches, workers, device, None
        self._augment_here = torch.device(device).type != "cpu"

    def __enter__(self) -> BatchMaker:
        if self.workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            global _WORKER_BATCHES
            _WORKER_BATCHES = self.batches  # inherited by the forked workers, never pickled
            # an executor, not a Pool: a worker killed (out of memory) breaks it at once, where a Pool waits for ever
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("fork"), initializer=_quiet_worker
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # what runs is a batch: milliseconds
            self._pool = None

    def epoch(self, seed: int, epoch: int, steps: int):
        if self._pool is None:
            for _ in range(steps):
                yield self.batches.augment(self.batches.draw(), self.device)
            return
        import collections
        from concurrent.futures.process import BrokenProcessPool

        pending: collections.deque = collections.deque()
        todo = iter(range(steps))
        for step in todo:  # at most two batches a worker in flight: each is tens of megabytes
            pending.append(self._pool.submit(_worker_batch, (seed, epoch, step), self._augment_here))
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            try:
                made = pending.popleft().result()
            except BrokenProcessPool:
                raise StreamtagError(
                    "a batch worker died (killed, out of memory?); the last checkpoint holds the finished "
                    "epochs: resume with --resume, with fewer --loader-workers"
                ) from None
            step = next(todo, None)
            if step is not None:
                pending.append(self._pool.submit(_worker_batch, (seed, epoch, step), self._augment_here))
            if self._augment_here:
                yield self.batches.augment(made, self.device)
            else:
                x, y, level0 = made
                yield torch.from_numpy(x).float(), torch.from_numpy(y).float(), torch.from_numpy(level0)


_WORKER_BATCHES: _Batches | None = None


def _quiet_worker() -> None:
    """A Ctrl-C at a terminal reaches the workers too: they leave it to the training process, which saves,
    says how to resume and ends them; and that end (SIGTERM) is a plain exit, not the training process's
    handler inherited through fork, which turned it into a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)  # one core a worker; and a forked child must not enter the parent's thread pool


def _worker_batch(key: tuple[int, int, int], draw_only: bool) -> Plan | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch ``key`` drawn (for a GPU to augment) or drawn and augmented, its audio and targets as float16:
    half the bytes through the pipe, 0.016 log-mel units (0.07 dB) at the loudest, targets to 1e-3."""
    batches = _WORKER_BATCHES
    batches.rng = np.random.default_rng(list(key))
    plan = batches.draw()
    if draw_only:
        return plan.compact()
    x, y, level0 = batches.augment(plan)
    return x.numpy().astype(np.float16), y.numpy().astype(np.float16), level0.numpy()


CLASS_ROWS = ("head.proj.weight", "head.proj.bias")  # the output layer: one row per class


def _start_from(model, cfg: ModelConfig, folder: str) -> str | None:
    """Fine-tuning: the weights of a trained model with the same architecture and parameters; returns a note
    when the labels differ.

    Another label set is transfer learning, what a user fine-tuning the bundled model on their own sounds
    expects: every weight is taken except the output layer's rows, which are taken for the classes both
    have (by name) and start untrained for the new ones; the starting model's other classes are dropped.

    Two differences are allowed, each growing the model from where the other one ended: this run may add
    the head's gate (``pool_gate=true``) to a model trained without one (the gate starts open), and a CNN
    may append conv blocks to the other model's (``dilations`` that begin with its dilations): the new
    blocks start with a small batch-norm scale, so the deeper model starts close to the shallower one and
    training decides what the extra depth is for.
    """
    from ..models.io import load_model

    init_cfg, init_model = load_model(folder)
    adds_gate = bool(cfg.arch_params.get("pool_gate")) and not init_cfg.arch_params.get("pool_gate")
    new_blocks = _appended_blocks(model, init_model)
    grown = {"pool_gate"} if adds_gate else set()
    grown |= {"dilations"} if new_blocks else set()
    mine_params = {k: v for k, v in cfg.arch_params.items() if k not in grown}
    theirs_params = {k: v for k, v in init_cfg.arch_params.items() if k not in grown}
    for what, mine, theirs in (
        ("architecture", cfg.arch, init_cfg.arch),
        ("arch parameters", mine_params, theirs_params),
        ("features", cfg.features, init_cfg.features),
    ):
        if mine != theirs:
            raise ConfigError(
                f"--init {folder}: its {what} {'differs' if what == 'architecture' else 'differ'} from this "
                f"run's ({theirs} there, {mine} here); give the same --arch, --arch-param, --output and "
                "--level-seconds, or train from scratch"
            )
    state, note = init_model.state_dict(), None
    labels, init_labels = list(cfg.labels), list(init_cfg.labels)
    if labels != init_labels:
        own = model.state_dict()
        shared = [(i, init_labels.index(x)) for i, x in enumerate(labels) if x in init_labels]
        for key in CLASS_ROWS:
            rows = own[key].clone()
            for i, j in shared:
                rows[i] = state[key][j]
            state[key] = rows
        kept = [labels[i] for i, _ in shared]
        new = [x for x in labels if x not in init_labels]
        dropped = [x for x in init_labels if x not in labels]
        parts = [
            f"{len(kept)} of its {len(init_labels)} classes {'goes' if len(kept) == 1 else 'go'} on as learned "
            f"({some(kept, 4) or 'none'})"
        ]
        if new:
            parts.append(f"{count(len(new), 'new class starts', 'new classes start')} untrained ({some(new, 4)})")
        if dropped:
            parts.append(f"{len(dropped)} it had are left out ({some(dropped, 4)})")
        note = f"--init {folder}: " + "; ".join(parts)
    missing, unexpected = model.load_state_dict(state, strict=not (adds_gate or new_blocks))
    new_prefixes = ("head.gate.",) * adds_gate + tuple(f"{m}.{i}." for i in new_blocks for m in ("convs", "norms"))
    if unexpected or any(not k.startswith(new_prefixes) for k in missing):
        raise ConfigError(f"--init {folder}: its weights do not fit this model ({missing + unexpected})")
    with torch.no_grad():
        for i in new_blocks:
            model.norms[i].weight.fill_(GROWN_BLOCK_SCALE)
    return note


# small enough to leave the model's output nearly as it was; not zero, since a ReLU held at 0 learns nothing
GROWN_BLOCK_SCALE = 0.1


def _appended_blocks(model, init_model) -> list[int]:
    """Indices of the conv blocks ``model`` has after all of ``init_model``'s (none unless it only appends)."""
    mine, theirs = getattr(model, "dilations", None), getattr(init_model, "dilations", None)
    if mine is None or theirs is None or len(mine) <= len(theirs) or mine[: len(theirs)] != theirs:
        return []
    return list(range(len(theirs), len(mine)))


def _check_every_class_is_taught(labels, hard: np.ndarray, teacher, label_map) -> None:
    """A class no training clip is labelled with and no teacher scores would sit at its initial output."""
    mapped = {label for label, m in zip(labels, teacher.mapping(labels, label_map)) if m.size} if teacher else set()
    silent = [label for c, label in enumerate(labels) if not (hard[:, c] == 1).any() and label not in mapped]
    if silent:
        raise ConfigError(
            f"no training signal for {', '.join(silent[:5])}: no training clip has that label and no teacher "
            "class is mapped to it; add clips of it, or map it in --label-map"
        )


def _set_feature_statistics(model, train_feats: list[np.ndarray]) -> None:
    """Per-band mean and spread of the trunk's input, measured on the (level-normalised) training features."""
    sample = train_feats if len(train_feats) <= 2000 else [train_feats[i] for i in range(0, len(train_feats), 4)]
    with torch.no_grad():
        normed = []
        for x in sample:
            t = torch.from_numpy(np.asarray(x[:3000], dtype=np.float32))[None]
            if model.level is not None:
                t, _ = model.level(t, model.level.init_state(1, "cpu"))
            normed.append(t[0].numpy())
    stacked = np.concatenate(normed)
    model.feat_mean.copy_(torch.from_numpy(stacked.mean(0)))
    model.feat_std.copy_(torch.from_numpy(stacked.std(0) + 1e-3))


def _soft_targets(dataset: Dataset, opts: TrainOptions, teacher, label_map):
    """``soft(i, first_frame, n_frames) -> (n, classes)`` from cached teacher windows, or None without a teacher."""
    if teacher is None:
        return None
    from .teacher import fill_cache

    mapping = teacher.mapping(dataset.labels, label_map)
    if not any(m.size for m in mapping):
        raise ConfigError("--teacher: none of the model's labels is in the label map (--label-map)")
    paths = [c.path for c in dataset.clips]
    fill_cache(teacher, paths, opts.features.sample_rate)
    mapped: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # clip -> (window ends, its classes' scores)

    def soft(i: int, first: int, n: int) -> np.ndarray:
        if i not in mapped:
            windows = teacher.windows(dataset.clips[i].path, opts.features.sample_rate)
            mapped[i] = (windows["ends"], teacher.map_windows(windows, mapping))
        return teacher.frames(*mapped[i], n, opts.features.frame_seconds, first)

    return soft


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False)
    bar.start()
    return bar


def _save_checkpoint(
    path: Path, epoch, model, optim, sched, rng, history, best, total_epochs: int, labels, clips
) -> None:
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
            "labels": json.dumps(list(labels)),  # what --resume checks it continues the same run with
            "clips": json.dumps(clips),
        },
        tmp,
    )
    tmp.replace(path)


def _check_same_run(path: Path, labels, clips: list[str]) -> dict:
    """Refuse to resume onto other classes or other training clips (another dataset, split or label map);
    returns the checkpoint, read once for this check and for :func:`_load_checkpoint`."""
    if not path.is_file():
        raise ModelFileError(f"nothing to resume: {path} does not exist (drop --resume to start fresh)")
    try:
        loaded = ckpt = torch.load(path, weights_only=True)  # never unpickles code
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise ModelFileError(f"{path} is not a checkpoint this run can resume ({str(exc).splitlines()[0]})") from None
    if "labels" not in ckpt:  # a checkpoint of an older streamtag: the model folder's files say the same
        config, listed = path.with_name("config.json"), path.with_name(TRAINED_ON)
        ckpt = {
            "labels": json.dumps(json.loads(config.read_text())["labels"]) if config.is_file() else None,
            "clips": json.dumps(trained_on(path.parent)[0]) if listed.is_file() else None,
        }
    fix = "resume with the same datasets, split and --label-map, or start again with --overwrite"
    if ckpt["labels"] is not None and json.loads(ckpt["labels"]) != list(labels):
        raise ConfigError(
            f"--resume: {path} was trained on the classes {json.loads(ckpt['labels'])}, this run has "
            f"{list(labels)}; {fix}"
        )
    if ckpt["clips"] is not None and json.loads(ckpt["clips"]) != clips:
        before = set(json.loads(ckpt["clips"]))
        new, gone = len(set(clips) - before), len(before - set(clips))
        raise ConfigError(
            f"--resume: {path} was trained on other clips ({new} of this run's are new, {gone} of its are not "
            f"in this run); {fix}"
        )
    return loaded


def _load_checkpoint(path: Path, ckpt: dict, model, optim, sched, rng, total_epochs: int):
    """The run's state from ``ckpt`` (read from ``path`` by :func:`_check_same_run`)."""
    try:
        if ckpt["epochs"] != total_epochs:
            raise ConfigError(
                f"{path} belongs to a run of --epochs {ckpt['epochs']}; resume with the same --epochs "
                "(the learning-rate schedule depends on it)"
            )
        total = ckpt["sched"].get("total_steps")
        if total is not None and total != sched.total_steps:  # else the schedule runs out mid-run, a traceback
            raise ConfigError(
                f"{path} belongs to a run of {total} steps in all ({total // total_epochs} an epoch), this one "
                f"has {sched.total_steps // total_epochs}; resume with the same --steps-per-epoch and --batch-size "
                "and the same clips"
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
