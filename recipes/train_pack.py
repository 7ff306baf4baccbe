#!/usr/bin/env python3
"""Train on a machine that does not hold the audio (a GPU box): pack the prepared data here, train there.

usage:
  python recipes/train_pack.py pack [--unlabelled-hours H] PACK.npz TRAIN-ARGUMENTS...
  python recipes/train_pack.py train PACK.npz OUT [--set KEY=JSON ...]

``pack`` takes the arguments of ``streamtag train`` (datasets, --unlabelled, --teacher, options; --out is
ignored) and does what that command does before its first epoch (features, teacher targets, the split, all
cached), then writes the result to one compressed file: log-mel quantised to 0.25 (1.1 dB) in a byte, as
frame differences under lzma, the teacher's window scores already mapped to the model's classes, labels,
groups, weights and the training options (not --init, a path on this machine, and not the validation
split: a packed run keeps its last epoch). The recipe's training data packs into about 11 MiB an hour.

``train`` runs the training loop of ``streamtag train`` on that file with the packed options, each ``--set``
replacing one (``--set epochs=60 --set arch_params='{"hidden": 128}'``; the device is cuda when there is one),
and writes a model folder; ``streamtag export`` there or back here gives its ONNX steps. It needs torch, numpy
and streamtag's source with its runtime packages: no audio and no teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import sys
from pathlib import Path

import numpy as np

STEP = 0.25  # log-mel units (nats of power) per quantisation step: 1.1 dB; rounding adds 0.3 dB rms per value
LOW = float(np.log(1e-9))  # the recipe's log floor: nothing is below it


def pack(path: Path, train_argv: list[str], unlabelled_hours: float | None = None) -> None:
    from streamtag.cli import build_parser
    from streamtag.cli.train import _options, _split, feature_cache, load_training_data
    from streamtag.training.datasets import clip_identity
    from streamtag.training.trainer import prepare

    args = build_parser().parse_args(["train", *train_argv, "--out", str(path) + ".unused"])
    opts = _options(args)
    if opts.features.log_floor != 1e-9:
        sys.exit("train_pack: the pack's quantiser assumes the log floor 1e-9")
    dataset, teacher, label_map = load_training_data(args)
    train_idx, val_idx = _split(dataset, args)
    prepared = prepare(dataset, train_idx, val_idx, opts, feature_cache(args), teacher, label_map)
    keep = _keep(prepared, opts, unlabelled_hours)
    train_idx = np.asarray(train_idx)[keep]
    feats = np.concatenate([prepared.feats[k] for k in keep])
    frames = np.array([len(prepared.feats[k]) for k in keep], dtype=np.int64)
    codes = np.clip(np.rint((feats - LOW) / STEP), 0, 255).astype(np.uint8)
    clipped = float(np.mean(feats > LOW + 255 * STEP))
    error = np.abs(codes * np.float32(STEP) + np.float32(LOW) - np.clip(feats, LOW, LOW + 255 * STEP)).max()
    assert error <= STEP / 2 + 1e-4, f"quantiser off by {error}"  # the floor is where the recipe's features start
    # frame-to-frame differences (mod 256, lossless) compress better than the codes; lzma beats zlib by a third
    diffs = np.diff(codes.astype(np.int16), axis=0, prepend=0).astype(np.uint8)
    arrays = {
        "feat_lzma": np.frombuffer(lzma.compress(diffs.tobytes(), preset=6), np.uint8),
        "feat_frames": frames,
        "hard": prepared.hard[keep].astype(np.float32),
    }
    if teacher is not None:
        mapping = teacher.mapping(dataset.labels, label_map)
        ends, scores, counts = [], [], []
        for i in train_idx:
            w = teacher.windows(dataset.clips[int(i)].path, opts.features.sample_rate)
            ends.append(w["ends"])
            scores.append(teacher.map_windows(w, mapping).astype(np.float16))
            counts.append(len(w["ends"]))
        arrays.update(
            window_ends=np.concatenate(ends), window_scores=np.concatenate(scores), window_counts=np.array(counts)
        )
    meta = {
        "labels": prepared.labels,
        "clips": sorted({clip_identity(dataset.clips[int(i)].path) for i in train_idx}),
        "groups": [prepared.groups[k] for k in keep],
        "weights": [prepared.weights[k] for k in keep],
        "options": dataclasses.asdict(dataclasses.replace(opts, init_from=None)),  # a path here, not there
        "step": STEP,
        "low": LOW,
        "n_mels": int(codes.shape[1]),
    }
    np.savez_compressed(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    hours = len(feats) * opts.features.frame_seconds / 3600
    size = path.stat().st_size / 2**20
    print(f"packed {len(frames)} training clips, {hours:.1f} h, into {path} ({size:.1f} MiB; {clipped:.2e} clipped)")


def _keep(prepared, opts, unlabelled_hours: float | None) -> np.ndarray:
    """Every labelled clip, and of the unlabelled ones a seeded random share with about ``unlabelled_hours`` of
    audio (every group keeps at least one clip, so no package drops out of the draws)."""
    n = len(prepared.feats)
    labelled = np.nan_to_num(prepared.hard, nan=0.0).max(1) > 0
    if unlabelled_hours is None:
        return np.arange(n)
    seconds = np.array([len(x) for x in prepared.feats]) * opts.features.frame_seconds
    share = min(1.0, unlabelled_hours * 3600 / max(seconds[~labelled].sum(), 1e-9))
    rng = np.random.default_rng(0)
    chosen = labelled | (rng.random(n) < share)
    for group in {g for g, lab in zip(prepared.groups, labelled) if not lab}:
        members = [k for k in range(n) if prepared.groups[k] == group and not labelled[k]]
        if not chosen[members].any():
            chosen[members[0]] = True
    return np.flatnonzero(chosen)


def load(path: Path, overrides: dict):
    """The pack as (Prepared, TrainOptions), the options with ``overrides`` applied."""
    from streamtag.config import FeatureConfig
    from streamtag.training.teacher import Teacher
    from streamtag.training.trainer import Prepared, TrainOptions

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays["meta"].tobytes())
    values = {**meta["options"], **overrides}
    values["features"] = FeatureConfig(**values["features"])
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        sys.exit(f"train_pack: no training option {unknown[0]!r} (options: {', '.join(sorted(fields))})")
    for key, value in values.items():  # JSON gives lists where the options hold tuples
        if isinstance(value, list) and key != "arch_params":
            values[key] = tuple(value)
    opts = TrainOptions(**values)
    diffs = np.frombuffer(lzma.decompress(arrays["feat_lzma"].tobytes()), np.uint8).reshape(-1, meta["n_mels"])
    codes = np.cumsum(diffs, axis=0, dtype=np.uint8)  # wraps mod 256 as the differences did
    feats = np.split(codes.astype(np.float32) * meta["step"] + meta["low"], np.cumsum(arrays["feat_frames"])[:-1])
    soft = None
    if "window_ends" in arrays:
        bounds = np.concatenate([[0], np.cumsum(arrays["window_counts"])])
        frame_s = opts.features.frame_seconds
        scores = arrays["window_scores"].astype(np.float32)  # NaN stays NaN: a class the teacher has no word for

        def soft(i: int, first: int, n: int) -> np.ndarray:
            a, b = bounds[i], bounds[i + 1]
            return Teacher.frames(arrays["window_ends"][a:b], scores[a:b], n, frame_s, first)

    prepared = Prepared(
        labels=meta["labels"],
        clips=meta["clips"],
        feats=feats,
        hard=arrays["hard"],
        soft=soft,
        groups=meta["groups"],
        weights=meta["weights"],
    )
    return prepared, opts


def _epochs_within(prepared, opts, minutes: float) -> int:
    """As many epochs as the batches made in ``minutes`` fill, timed on a few batches (the learning-rate
    schedule needs the number of steps up front, so a run on a lent machine sizes itself before it starts)."""
    import collections
    import time

    from streamtag.training.trainer import BatchMaker, batches_of

    batches = batches_of(prepared, opts, np.random.default_rng(0))
    probe = max(8, 4 * opts.loader_workers)
    with BatchMaker(batches, opts.loader_workers, opts.device) as maker:
        stream = maker.epoch(opts.seed + 1, 0, 2 * probe)
        for _ in range(probe):  # the workers' start and first batches are not the rate
            next(stream)
        start = time.perf_counter()
        batch = collections.deque(stream, maxlen=1)[0]  # the rest of the probe, timed; the last kept
        per_batch = (time.perf_counter() - start) / probe
    per_step = _step_seconds(batch, prepared, opts)
    # on the CPU the workers make whole batches while the step runs: the slower of the two sets the pace; on a
    # GPU this process augments each batch before its step (the probe timed that), so the two add up (at most);
    # a tenth spare for the epochs' saving and the machine's noise
    on_device = opts.device != "cpu"
    pace = 1.1 * (per_batch + per_step if on_device else max(per_batch, per_step))
    epochs = max(1, int(minutes * 60 / pace / opts.steps_per_epoch))
    print(
        f"{per_batch * 1000:.1f} ms a batch of {opts.batch_size}, {per_step * 1000:.1f} ms a training step: "
        f"{epochs} epochs of {opts.steps_per_epoch} steps in {minutes:g} minutes",
        file=sys.stderr,
        flush=True,
    )
    return epochs


def _step_seconds(batch, prepared, opts) -> float:
    """Seconds of one training step (forward, backward, update) of this model on one batch."""
    import time

    import torch

    from streamtag.models import build_model
    from streamtag.training.trainer import training_step

    cfg = opts.model_config(prepared.labels)
    model = build_model(cfg).to(opts.device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(13):
        start = time.perf_counter()
        training_step(model, optim, batch, cfg, 0, opts.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[3:]))


def train(path: Path, out: Path, settings: list[str], minutes: float = 0.0) -> None:
    from streamtag.training.trainer import fit

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"train_pack: --set {item}: expected KEY=JSON (e.g. epochs=60)")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            sys.exit(f"train_pack: --set {item}: the value is not JSON (a text needs quotes: device='\"cuda\"')")
    if "device" not in overrides:
        import torch

        overrides["device"] = "cuda" if torch.cuda.is_available() else "cpu"  # not the packing machine's
    prepared, opts = load(path, overrides)
    if minutes and not opts.steps_per_epoch:
        sys.exit("train_pack: --minutes needs a number of steps an epoch (--set steps_per_epoch=200)")
    if minutes:
        opts = dataclasses.replace(opts, epochs=_epochs_within(prepared, opts, minutes))
    print(f"training {opts.arch} {opts.arch_params} on {len(prepared.feats)} clips, {opts.device}", file=sys.stderr)
    result = fit(prepared, opts, out, progress=sys.stderr.isatty(), log=print)
    print(f"saved {out} (epoch {result['best']['epoch']}, loss {result['best']['loss']:.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="prepare streamtag train's data and write it to one file")
    a.add_argument("pack", type=Path)
    a.add_argument(
        "--unlabelled-hours",
        type=float,
        help="keep a seeded random share of the unlabelled clips with about this much audio (default: all)",
    )
    a.add_argument("train_args", nargs=argparse.REMAINDER, help="the arguments of streamtag train")
    b = sub.add_parser("train", help="train a model folder from a pack")
    b.add_argument("pack", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="replace one training option")
    b.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="set --epochs to what the batches made in this time fill "
        "(timed on a few batches first; needs steps_per_epoch)",
    )
    args = p.parse_args()
    if args.command == "pack":
        pack(args.pack, args.train_args, args.unlabelled_hours)
    else:
        train(args.pack, args.out, args.set, args.minutes)


if __name__ == "__main__":
    main()
