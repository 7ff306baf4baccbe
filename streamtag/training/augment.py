"""Training augmentation as whole-batch tensor operations, on whatever device trains the model.

A batch is made in two parts. Drawing it (``_Batches.draw`` in trainer.py) picks clips, cuts crops and
their targets and makes every random choice: cheap indexing, done on the CPU (in batch workers when there
are any). Augmenting it (:func:`augment`) applies those choices to the log-mel crops: mixing, band limits,
reverberation, a microphone noise floor, gain, a quiet lead, SpecAugment masks. That part is arithmetic on
every value of the batch, three quarters of a batch's cost when done crop by crop in numpy, and on a GPU it
runs in the time of the model's step, so a lent GPU is no longer kept waiting by the CPU (docs/MODEL.md,
"Trained on a GPU"). All of it happens in the log-mel domain, where adding two sounds' powers is a
``logaddexp``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

DB = math.log(10) / 10  # one decibel of power in log-mel units


@dataclasses.dataclass
class Plan:
    """A drawn batch: crops, the recordings mixed under some of them, final targets and every random choice
    of its augmentation, one row per crop. Values that mean "not for this crop": ``cut`` = bands,
    ``rt60`` = 0, ``noise_db`` = NaN, ``lead`` = 0, ``warm_db`` = NaN."""

    x: np.ndarray  # (batch, frames, bands) log-mel
    y: np.ndarray  # (batch, frames, classes) targets, NaN unknown; the mixing and lead rules already applied
    mixed: np.ndarray  # (k,) crops with a recording mixed under them
    under: np.ndarray  # (k, frames, bands) those recordings' log-mel
    snr_db: np.ndarray  # (k,) how far under
    cut: np.ndarray  # (batch,) first band silenced (band limiting)
    rt60: np.ndarray  # (batch,) seconds of the reverberation tail
    wet_db: np.ndarray  # (batch,) the tail's level against the dry sound
    noise_db: np.ndarray  # (batch,) the noise floor's level, dBFS of white noise
    tilt: np.ndarray  # (batch,) 0 white .. 1 pink
    gain_db: np.ndarray  # (batch,)
    lead: np.ndarray  # (batch,) frames of quiet floor before the crop
    lead_noise_db: np.ndarray  # (batch,) that floor's level
    lead_tilt: np.ndarray  # (batch,)
    warm_db: np.ndarray  # (batch,) the level estimate's start, dB from the crop's mean level
    masks: np.ndarray  # (batch, masks, 4) band start, bands, frame start, frames set to the floor
    seed: int  # of the noise

    @classmethod
    def empty(cls, batch: int, frames: int, bands: int, classes: int, masks: int) -> Plan:
        nan = np.full(batch, np.nan)
        return cls(
            x=np.empty((batch, frames, bands), np.float32),
            y=np.empty((batch, frames, classes), np.float32),
            mixed=np.zeros(0, np.int64),
            under=np.zeros((0, frames, bands), np.float32),
            snr_db=np.zeros(0),
            cut=np.full(batch, bands, np.int64),
            rt60=np.zeros(batch),
            wet_db=np.zeros(batch),
            noise_db=nan.copy(),
            tilt=np.zeros(batch),
            gain_db=np.zeros(batch),
            lead=np.zeros(batch, np.int64),
            lead_noise_db=np.zeros(batch),
            lead_tilt=np.zeros(batch),
            warm_db=nan.copy(),
            masks=np.zeros((batch, masks, 4), np.int64),
            seed=0,
        )

    def compact(self) -> Plan:
        """The same plan with its audio and targets as float16, half the bytes through a worker's pipe (0.016
        log-mel units, 0.07 dB, at the loudest; targets to 1e-3)."""
        half = {k: getattr(self, k).astype(np.float16) for k in ("x", "y", "under")}
        return dataclasses.replace(self, **half)


def augment(
    plan: Plan,
    floor: float,
    noise_bands: np.ndarray,
    frame_s: float,
    settled_frames: float,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, level0)`` on ``device``: the plan's crops augmented, its targets, and each crop's starting
    level-estimate state ``(level, frames counted)`` (zeros: a fresh stream).

    The steps, in order: the mixed recording at its SNR; band limiting; reverberation; the noise floor; the
    gain (the log floor stays where it is); the quiet lead; the level estimate's start; SpecAugment masks.
    """
    dev = torch.device(device)
    x = torch.tensor(plan.x, device=dev, dtype=torch.float32)  # a copy: the plan stays as drawn
    batch, frames, bands = x.shape
    gen = torch.Generator(device=dev)
    gen.manual_seed(plan.seed)

    def rows(values) -> torch.Tensor:  # a per-crop value, shaped to broadcast over (frames, bands)
        return torch.as_tensor(np.asarray(values, np.float32), device=dev).view(-1, 1, 1)

    def index(which: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(which, device=dev)

    band, t = torch.arange(bands, device=dev), torch.arange(frames, device=dev)
    log_floor = torch.tensor(floor, device=dev)
    tilt_shape = torch.log(band + 1.0)  # pink noise falls by this (times the tilt) from white
    white = torch.as_tensor(noise_bands, device=dev).float()

    def noise(level_db: np.ndarray, tilt: np.ndarray) -> torch.Tensor:  # a microphone's fluctuating self-noise
        n = len(level_db)
        wobble = torch.randn((n, frames, bands), generator=gen, device=dev) * 0.3
        return white + rows(level_db) * DB - rows(tilt) * tilt_shape + wobble

    if len(plan.mixed):
        i = index(plan.mixed)
        a, b = x[i], torch.as_tensor(plan.under, device=dev).float()
        shift = _level(a) - _level(b) - rows(plan.snr_db) * DB
        x[i] = torch.logaddexp(a, b + shift)
    # band limits: the bands centred above the cutoff drop to the log floor (the noise floor added after this
    # fills them, as it would an upsampled telephone recording)
    x = torch.where(band >= torch.as_tensor(plan.cut, device=dev).view(-1, 1, 1), floor, x)
    r = np.flatnonzero(plan.rt60 > 0)
    if r.size:
        i = index(r)
        x[i] = reverberate(x[i], plan.rt60[r], plan.wet_db[r], frame_s)
    n = np.flatnonzero(~np.isnan(plan.noise_db))
    if n.size:
        i = index(n)
        x[i] = torch.logaddexp(x[i], noise(plan.noise_db[n], plan.tilt[n]))
    x = torch.logaddexp(x + rows(plan.gain_db) * DB, log_floor)
    q = np.flatnonzero(plan.lead > 0)
    if q.size:  # the crop later by `lead` frames, behind a quiet floor: its onset then meets running means and a
        # level estimate filled with quiet, as a sound in a live stream does
        i, lead = index(q), torch.as_tensor(plan.lead[q], device=dev).view(-1, 1)
        source = (t - lead).clamp(min=0)[:, :, None].expand(-1, -1, bands)
        shifted = torch.gather(x[i], 1, source)
        quiet = torch.logaddexp(noise(plan.lead_noise_db[q], plan.lead_tilt[q]), log_floor)
        x[i] = torch.where((t < lead)[:, :, None], quiet, shifted)
    level0 = torch.zeros((batch, 2), device=dev)
    w = np.flatnonzero(~np.isnan(plan.warm_db))
    if w.size:
        i = index(w)
        level0[i, 0] = x[i].mean(dim=(1, 2)) + torch.as_tensor(plan.warm_db[w], device=dev).float() * DB
        level0[i, 1] = float(settled_frames)
    for m in range(plan.masks.shape[1]):  # SpecAugment: a band and a stretch of time set to silence
        f0, fw, t0, tw = (torch.as_tensor(plan.masks[:, m, j], device=dev).view(-1, 1, 1) for j in range(4))
        masked = ((band >= f0) & (band < f0 + fw)) | ((t[:, None] >= t0) & (t[:, None] < t0 + tw))
        x = torch.where(masked, floor, x)
    return x, torch.tensor(plan.y, device=dev, dtype=torch.float32), level0  # copies: the plan stays as drawn


def _level(x: torch.Tensor) -> torch.Tensor:
    """Each crop's log of its mean power, ``(n, 1, 1)``."""
    return (torch.logsumexp(x.flatten(1), dim=1) - math.log(x[0].numel())).view(-1, 1, 1)


def reverberate(x: torch.Tensor, rt60: np.ndarray, wet_db: np.ndarray, frame_s: float) -> torch.Tensor:
    """A late-reverberation tail per band: each crop's power smeared by an exponential decay of ``rt60``
    seconds, added ``wet_db`` under it. The decay, ``tail[t] = a tail[t-1] + (1 - a) p[t]``, is one matrix
    product per crop (a lower-triangular matrix of powers of ``a``) rather than a loop over frames."""
    dev, frames = x.device, x.shape[1]
    a = torch.as_tensor(np.exp(-6.9 * frame_s / np.asarray(rt60)), device=dev, dtype=torch.float32).view(-1, 1, 1)
    t = torch.arange(frames, device=dev)
    lag = (t[:, None] - t[None, :]).float()  # (frames, frames): how far back each frame is
    decay = torch.where(lag >= 0, (1 - a) * torch.exp(lag.clamp(min=0) * torch.log(a)), 0.0)
    p = torch.exp(x)
    wet = torch.as_tensor(10 ** (np.asarray(wet_db) / 10), device=dev, dtype=torch.float32).view(-1, 1, 1)
    return torch.log(p + wet * (decay @ p))
