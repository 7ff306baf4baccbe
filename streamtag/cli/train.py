"""``streamtag train``: train a causal model on a labelled dataset; ``--cv K`` for cross-validated figures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from ..errors import ConfigError, stop_exit_code


def _arch_param(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE ({text!r} given), e.g. hidden=96")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on labelled audio",
        description="Train a causal model. Each DATASET is an ESC-50 folder (meta/esc50.csv + audio/), a folder "
        "per class (DATASET/<label>/*.wav), or a CSV manifest (path,label[,fold][,group]). Several datasets "
        "train one model; --label-map renames their labels (dog_bark -> dog). With --teacher, an AudioSet "
        "tagger's scores become soft frame targets (knowledge distillation) and --unlabelled audio "
        "can be learned from.",
    )
    p.add_argument("dataset", nargs="+", help="labelled audio: an ESC-50 folder, a folder per class, or a CSV manifest")
    p.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    p.add_argument("--arch", default="cnn", help="lstm, attention or cnn (default cnn)")
    p.add_argument(
        "--arch-param",
        action="append",
        type=_arch_param,
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, JSON value (repeatable), e.g. hidden=96 or pool_seconds=[0.5,3]",
    )
    p.add_argument(
        "--output",
        choices=["sigmoid", "softmax"],
        default="sigmoid",
        help="sigmoid: independent probability per class, several sounds at once or none (default); "
        "softmax: one class per clip, for truly single-label data",
    )
    p.add_argument(
        "--level-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="time constant of the input-level normaliser that makes the model gain-invariant (0: none; default 3)",
    )
    p.add_argument("--teacher", metavar="ONNX", help="AudioSet tagger for soft targets (audioset_labels.csv beside it)")
    p.add_argument(
        "--label-map",
        metavar="TSV",
        help="label<TAB>AudioSet names<TAB>aliases; its aliases rename dataset labels, as eval does (default: the "
        "packaged map of ESC-50, UrbanSound8K, speech, music: dog_bark -> dog, engine_idling -> engine, "
        "street_music -> music)",
    )
    p.add_argument(
        "--teacher-labels",
        default="",
        metavar="A,B",
        help="classes learned from the teacher alone (no dataset labels them), e.g. speech,music",
    )
    p.add_argument(
        "--teacher-weight",
        type=float,
        default=0.5,
        metavar="W",
        help="where a label is known, target = (1 - W) * label + W * teacher (default 0.5)",
    )
    p.add_argument(
        "--unlabelled",
        action="append",
        default=[],
        metavar="PATH",
        help="audio without labels (folder or CSV with path[,group][,weight]: a group of weight 3 is drawn "
        "three times as often), learned from the teacher (repeatable)",
    )
    p.add_argument("--epochs", type=int, default=80, help="passes over the data (default 80)")
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        metavar="N",
        help="batches per epoch (default: one pass over the clips)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="crops per training step (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the crops and the weights (default 0)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fold", type=int, metavar="F", help="validate on the dataset's fold F")
    split.add_argument("--no-val", action="store_true", help="train on every clip (no validation)")
    split.add_argument(
        "--cv",
        type=int,
        metavar="K",
        help="K-fold source-grouped cross-validation: K models, streaming eval and baseline per fold "
        "(2 <= K <= the number of source recordings)",
    )
    p.add_argument("--jobs", type=int, default=1, help="with --cv: folds trained in parallel (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores / jobs)")
    p.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        metavar="N",
        help="processes that draw the batches (crops, targets; on the CPU they augment them too, on a GPU the GPU "
        "does); a GPU waits for them, so try the number of cores less one; each batch then has its own seed, so a "
        "run's batches differ from those of the same run with 0 (default 0: in the training process)",
    )
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument(
        "--warm-level",
        type=float,
        default=0.5,
        metavar="P",
        help="share of training crops whose level estimate starts settled 50 dB below to 10 dB above the crop, "
        "as a stream meets a sound after quiet or loud audio (default 0.5; 0 for fresh estimates only)",
    )
    p.add_argument(
        "--band-limit",
        type=float,
        default=0.2,
        metavar="P",
        help="share of training crops with nothing above a random 3.4-7 kHz, as telephone and 8 kHz recordings "
        "have, so a class recorded that way is not learned by its missing top octave (default 0.2)",
    )
    p.add_argument(
        "--audible-snr",
        type=float,
        default=12.0,
        metavar="DB",
        help="a second recording mixed under a crop (0-25 dB down) counts as heard down to this many dB; further "
        "under, its classes are left out of the loss rather than taught as present (default 12; 25 or more: "
        "always heard, as before 2026-12)",
    )
    p.add_argument(
        "--label-frames",
        type=float,
        default=0.0,
        metavar="DB",
        help="a clip's label names a sound, not which frames hold it: teach it as 1 on the frames within DB of the "
        "clip's loudest (not blended with the teacher) and leave quieter frames to the teacher alone (e.g. 20; "
        "default 0: the label on every frame, blended)",
    )
    p.add_argument(
        "--unmapped-negatives",
        action="store_true",
        help="with --teacher: a class the teacher has no counterpart for (ESC-50's can_opening, drinking_sipping, "
        "washing_machine) is taught absent on frames where no clip label speaks of it and the teacher hears one "
        "of the mapped classes (speech, music, a dog); without it only labelled clips of other classes say it is "
        "absent, and it may fire on speech and music",
    )
    p.add_argument(
        "--quiet-lead",
        type=float,
        default=0.0,
        metavar="P",
        help="share of training crops that begin with 0.5-2 s of a quiet microphone floor (nothing to detect) "
        "before the sound, as a live stream meets one after a quiet room (default 0)",
    )
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this trained model's weights, or 'default' for the bundled model (fine-tuning: its "
        "--arch-param values come with it; it may add pool_gate=true, and a CNN's dilations may append blocks; "
        "classes of your data it has go on from what it learned, new ones start untrained, its others are left out)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out (default: refuse)")
    p.add_argument("--cache", metavar="DIR", help="feature cache (default: $STREAMTAG_CACHE/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _options(args):
    import torch

    from ..training.trainer import TrainOptions

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ConfigError(f"--device {args.device}: choose auto, cpu or cuda (cuda:N for one GPU of several)")
    if not 0 <= args.audible_snr < float("inf"):
        raise ConfigError(f"--audible-snr must be 0 dB or more ({args.audible_snr} given; 25 or more: always heard)")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be 1 or more ({args.jobs} given)")
    if not 0 <= args.loader_workers <= 256:
        raise ConfigError(f"--loader-workers must be in 0..256 ({args.loader_workers} given; 0: batches in-process)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be 1 or more ({args.threads} given; leave it out for all cores)")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in 0..{2**32 - 1} ({args.seed} given)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is visible (use --device cpu)")
    from ..models import architectures

    if args.arch not in architectures():
        raise ConfigError(f"unknown --arch '{args.arch}' (choose from: {', '.join(architectures())})")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise ConfigError(
            f"--steps-per-epoch must be >= 1 ({args.steps_per_epoch} given; leave it out for one pass over the clips)"
        )
    if args.cv is not None and args.cv < 2:  # the upper bound, the number of recordings, once the data is read
        raise ConfigError(f"--cv {args.cv}: K-fold cross-validation needs K >= 2 (or drop --cv to train one model)")
    if not (args.level_seconds >= 0 and args.level_seconds < 3600):
        raise ConfigError(f"--level-seconds must be in 0..3600 ({args.level_seconds} given)")
    if args.init == "default":  # as eval and replay name the bundled model
        from ..modelfile import resolve_model_dir

        args.init = str(resolve_model_dir(None))
    if args.init and not (Path(args.init) / "config.json").is_file():
        raise ConfigError(f"--init {args.init}: not a model folder (no config.json there)")
    if (args.unlabelled or args.teacher_labels or args.unmapped_negatives) and not args.teacher:
        raise ConfigError(
            "--unlabelled, --teacher-labels and --unmapped-negatives need --teacher (their targets come from it)"
        )
    arch_params = dict(args.arch_param)
    if args.init:  # fine-tuning: the starting model's parameters (given by hand, before), any given on top
        from ..modelfile import load_config

        start = load_config(Path(args.init))
        if start.arch == args.arch:
            arch_params = {**start.arch_params, **arch_params}
    opts = TrainOptions(
        arch=args.arch,
        arch_params=arch_params,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        output=args.output,
        level_seconds=args.level_seconds,
        teacher_weight=args.teacher_weight,
        steps_per_epoch=args.steps_per_epoch or 0,
        init_from=args.init,
        warm_level_p=args.warm_level,
        quiet_lead_p=args.quiet_lead,
        band_limit_p=args.band_limit,
        audible_snr_db=args.audible_snr,
        unmapped_negatives=args.unmapped_negatives,
        label_frames_db=args.label_frames,
        loader_workers=args.loader_workers,
    )
    _check_arch_params(opts)
    return opts


def _check_arch_params(opts) -> None:
    """A bad --arch-param fails here in one line naming the architecture's keys, not in torch's words."""
    import inspect
    import warnings

    import torch

    from ..models import build_model

    if not opts.arch_params:
        return
    try:
        with warnings.catch_warnings(), torch.no_grad():  # torch's own warnings about a size of 0: said below
            warnings.simplefilter("ignore")
            config = opts.model_config(("a", "b"))
            model = build_model(config)  # a size of 0 builds, and fails at its first frames: here, not later
            model(torch.zeros(1, 4, config.features.n_mels), model.init_state(1))
    except (ConfigError, RuntimeError, ValueError) as exc:
        keys = set()
        plain = dataclasses.replace(opts, arch_params={})
        for cls in type(build_model(plain.model_config(("a", "b")))).__mro__:
            init = cls.__dict__.get("__init__")
            if init is not None:
                keys |= {
                    name
                    for name, par in inspect.signature(init).parameters.items()
                    if par.kind not in (par.VAR_KEYWORD, par.VAR_POSITIONAL)
                }
        keys -= {"self", "n_mels", "num_classes", "features"}
        unknown = sorted(set(opts.arch_params) - keys)
        raw = [f"{k}={v}" for k, v in opts.arch_params.items() if isinstance(v, str)]  # not JSON: read as text
        if unknown:
            reason = f"{opts.arch} has no {', '.join(unknown)}"
        elif raw:
            reason = f"{', '.join(raw)} is not a JSON value"
        else:  # the model's own check (kernel must be ...), or torch's words when nothing better is known
            reason = str(exc).removeprefix(f"bad arch_params for '{opts.arch}': ").splitlines()[0]
        raise ConfigError(
            f"--arch-param: {reason}; {opts.arch} takes {', '.join(sorted(keys))}, each as KEY=VALUE with a JSON "
            "value (hidden=96, pool_seconds=[0.5,3], pool_gate=true)"
        ) from None


def _labels_kept(args) -> set[str]:
    """Labels of the model a run goes on from (--init, or the checkpoint --resume continues): never renamed, so
    a model trained as dog_bark before the label map applied by default goes on as dog_bark."""
    from ..modelfile import load_config

    folders = [Path(args.init)] if args.init else []
    if args.resume and (Path(args.out) / "config.json").is_file():
        folders.append(Path(args.out))
    return {label for folder in folders for label in load_config(folder).labels}


def load_training_data(args):
    """The datasets, unlabelled audio, teacher and label map that the arguments name."""
    from ..modelfile import cache_dir, writable_cache
    from ..training.datasets import check_group_weights, combine, load_dataset, read_unlabelled
    from ..training.teacher import Teacher, read_label_map

    # always a label map (the packaged one by default), as eval reads labels: a model trained on dog_bark clips
    # is scored by eval against dog, so it must be trained as dog
    label_map = read_label_map(args.label_map)
    several = len(args.dataset) > 1 or bool(args.unlabelled or args.teacher_labels)
    datasets = [load_dataset(d, min_classes=1 if several else 2) for d in args.dataset]
    kept = _labels_kept(args)
    aliases = {x: to for x, to in label_map.aliases.items() if x not in kept}
    renamed = sorted({f"{x} -> {aliases[x]}" for ds in datasets for x in ds.labels if x in aliases})
    which = f"--label-map {args.label_map}" if args.label_map else "the packaged label map; --label-map for another"
    for note in [n for ds in datasets for n in ds.notes] + (
        [f"labels renamed ({which}): {', '.join(renamed)}"] if renamed else []
    ):
        print(f"streamtag train: note: {note}", file=sys.stderr)
    sources = [(str(path), read_unlabelled(path)) for path in args.unlabelled]
    check_group_weights(sources)  # two manifests may share a group name, and then must agree on its weight
    unlabelled = [clip for _, clips in sources for clip in clips]
    extra = tuple(x.strip() for x in args.teacher_labels.split(",") if x.strip())
    missing = [x for x in extra if x not in label_map.targets]
    if missing:
        raise ConfigError(f"--teacher-labels {','.join(missing)}: not in the label map (see --label-map)")
    dataset = combine(datasets, aliases, unlabelled, extra)
    if len(dataset.labels) < 2:
        raise ConfigError(f"need at least 2 classes to train ({len(dataset.labels)} found: {dataset.labels})")
    teacher = None
    if args.teacher:
        teacher = Teacher(args.teacher, cache=writable_cache(cache_dir() / "teacher"))
    return dataset, teacher, label_map


def feature_cache(args) -> Path:
    """--cache, or the features folder of the cache directory."""
    from ..modelfile import cache_dir, writable_cache

    return writable_cache(Path(args.cache), "--cache") if args.cache else writable_cache(cache_dir() / "features")


def run(args) -> int:
    import torch

    from ..training.trainer import train
    from . import interrupt_on_signals

    opts = _options(args)
    _check_out(Path(args.out), args)
    dataset, teacher, label_map = load_training_data(args)
    if args.overwrite:  # only once the data checked out: a typo in a dataset path must not cost the old model
        _clear_stale(Path(args.out))
    cache = feature_cache(args)
    jobs = max(1, args.jobs if args.cv else 1)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // jobs))
    if args.cv or not (args.no_val or args.val_fold is not None):
        _say_if_ungrouped(dataset)
    if args.cv:
        from ..training.crossval import cross_validate
        from ..training.evaluate import write_report

        threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
        report = cross_validate(dataset, opts, args.out, cache, args.cv, args.seed, jobs, threads, teacher, label_map)
        report["dataset"] = " + ".join(args.dataset)
        write_report(report, args.out, plot=True)
        print(Path(args.out, "report.md").read_text())
        return 0
    train_idx, val_idx = _split(dataset, args)
    print(
        f"training {opts.arch} on {len(train_idx)} clips, validating on {len(val_idx)}, {len(dataset.labels)} classes",
        file=sys.stderr,
    )
    if args.init and len(val_idx):  # a validation clip the --init model learned from is not held out
        from ..training.datasets import clip_identity, learned_clips

        learned = learned_clips(args.init)
        seen = sum(clip_identity(dataset.clips[i].path) in learned for i in val_idx)
        if seen:
            print(
                f"streamtag train: note: {seen} of the {len(val_idx)} validation clips were in the training set of "
                f"--init {args.init}: the validation figures are not held-out figures",
                file=sys.stderr,
            )
    interrupt_on_signals()
    try:
        result = train(
            dataset,
            train_idx,
            val_idx,
            opts,
            args.out,
            cache,
            args.resume,
            progress=not args.quiet,
            log=lambda line: None if not args.quiet else print(line, file=sys.stderr),
            teacher=teacher,
            label_map=label_map,
        )
    except KeyboardInterrupt as stop:
        if args.overwrite and (Path(args.out) / "checkpoint.pt").is_file():  # new weights saved: the old go
            _drop_old_events(Path(args.out))
        _say_how_to_resume(args)
        return stop_exit_code(stop)
    if args.overwrite:
        _drop_old_events(Path(args.out))
    best = result["best"]
    figures = (
        f", validation {best['acc_mean']:.1%} mean over frames, {best['acc_last']:.1%} last frame"
        if ("acc_mean" in best)
        else ""
    )
    print(
        f"saved {args.out} (epoch {best['epoch']}, loss {best['loss']:.3f}{figures}); "
        f"log in {Path(args.out) / 'train_log.json'}"
    )
    return 0


def _split(dataset, args) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation clips. Unlabelled clips (the teacher's alone) always train; a class that would
    validate on all its clips (one source recording) trains instead; and no source recording is on both
    sides: training clips of a group that validates (UrbanSound8K and ESC-50 share Freesound recordings) are
    left out. What is moved is said in one line each."""
    from ..training.datasets import grouped_folds

    idx = np.arange(len(dataset.clips))
    if args.no_val:
        return idx, idx[:0]
    labels = np.array([c.label for c in dataset.clips])
    if args.val_fold is not None:
        folds = np.array([c.fold if c.fold is not None else -1 for c in dataset.clips])
        if not (folds == args.val_fold).any():
            known = sorted({int(f) for f in folds if f >= 0})
            raise ConfigError(
                f"--val-fold {args.val_fold}: no clip has that fold "
                + (f"(folds: {known})" if known else "(this dataset has no folds; drop --val-fold)")
            )
        val = (folds == args.val_fold) & (labels != "")
    else:
        val = (grouped_folds(dataset, 5, args.seed) == 0) & (labels != "")
        alone = sorted(label for label in set(labels[labels != ""]) if val[labels == label].all())
        for label in alone:
            val[labels == label] = False
        if alone:
            print(
                f"streamtag train: note: {', '.join(alone[:5])}: every clip is one source recording (or too few to "
                "split), so it trains and is not validated",
                file=sys.stderr,
            )
    held = {dataset.clips[i].group for i in idx[val]}
    leak = ~val & np.array([c.group in held for c in dataset.clips])
    if leak.any():
        example = dataset.clips[int(np.flatnonzero(leak)[0])].group
        print(
            f"streamtag train: note: {int(leak.sum())} clips share a source recording with validation clips "
            f"(e.g. group {example}): left out of training, so none is on both sides",
            file=sys.stderr,
        )
    return idx[~val & ~leak], idx[val]


def _say_if_ungrouped(dataset) -> None:
    """Splits keep a group (source recording) on one side; without groups that is each file on its own."""
    labelled = [c for c in dataset.clips if c.label]
    if labelled and len({c.group for c in labelled}) == len(labelled):
        print(
            "streamtag train: note: every clip is a group of its own here (a folder dataset, a manifest without a "
            "group column, or one that gives each clip its own group), so clips cut from one recording may sit on "
            "both sides of the split; name each clip's source recording in a CSV manifest's group column to keep "
            "them together",
            file=sys.stderr,
        )


def _check_out(out: Path, args) -> None:
    """Never replace a trained model by surprise, and find an unwritable --out before the features are computed."""
    from ..outputs.files import check_output_folder

    if str(args.out) == "default":  # --model default and eval default would not find it
        raise ConfigError("--out default: 'default' names the bundled model in every command; give another name")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist; create it first")
    check_output_folder(out, "--out")  # a file in its place, or a place nothing can be written
    for data in args.dataset:
        if Path(data).is_dir() and out.resolve() == Path(data).resolve():
            raise ConfigError(
                f"--out {out} is the dataset folder: the model's files would go among its audio; "
                f"give a folder of its own, e.g. --out {out.resolve().name}_model"
            )
    if args.cv and any(out.glob("fold*/config.json")) and not args.overwrite:
        raise ConfigError(f"--out {out} already holds cross-validation models; add --overwrite to replace them")
    if args.resume and not args.cv and not (out / "checkpoint.pt").is_file():  # said before the dataset is read
        raise ConfigError(f"nothing to resume: {out / 'checkpoint.pt'} does not exist (drop --resume to start fresh)")
    if (out / "config.json").exists() and not (args.resume or args.overwrite or args.cv):
        raise ConfigError(f"--out {out} already holds a model; add --overwrite to replace it or --resume to continue")


def _clear_stale(out: Path) -> None:
    """A model being replaced loses what would no longer match it (its exported graph, checkpoint, log); its
    weights and their trained_on.txt stay until the new run's first save replaces them together, so a run
    refused by a later check, or stopped before its first epoch ended, leaves the old model whole."""
    for stale in ("model.onnx", "chunk.onnx", "checkpoint.pt", "train_log.json"):
        (out / stale).unlink(missing_ok=True)


def _drop_old_events(out: Path) -> None:
    """The replaced model's events.toml goes with its weights: its thresholds were calibrated for them, and one
    naming a class the new model lacks made every later command on the folder fail."""
    events = out / "events.toml"
    if events.is_file():
        events.unlink()
        print(
            f"streamtag train: note: removed {events}, the replaced model's event thresholds (calibrate the new "
            "model's, e.g. recipes/calibrate_events.py, or give --event-config when you use it)",
            file=sys.stderr,
        )


def _say_how_to_resume(args) -> None:
    import torch

    ckpt = Path(args.out) / "checkpoint.pt"
    if ckpt.is_file():
        epoch = torch.load(ckpt, weights_only=True)["epoch"]
        print(
            f"streamtag train: interrupted; {ckpt} holds epoch {epoch} of {args.epochs}. Resume with the same "
            "command plus --resume",
            file=sys.stderr,
        )
    else:
        print("streamtag train: interrupted before the first epoch ended; nothing to resume", file=sys.stderr)
