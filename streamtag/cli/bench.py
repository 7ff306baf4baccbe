"""``streamtag bench``: does this machine run this model in real time? A short measurement of the engine.

The full suite (batched scale, memory, the silero-vad peer, whole-process CPU, every architecture)
lives in ``benchmarks/run_benchmarks.py``; it is for developers, this is for a user's machine.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time

import numpy as np

from ..errors import ConfigError
from ..outputs.files import check_output_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="check that this machine runs a model in real time",
        description="Time the engine on this machine: every 10 ms hop through the model and the event detector, "
        "back to back and paced as a microphone delivers it, with the model alone beside it. Says whether the "
        "model runs in real time (exit 1 when it does not; judged on the paced run) and what share of a core one "
        "stream takes. Writes JSON only with --out. "
        "(The full benchmark suite is benchmarks/run_benchmarks.py in the source tree.)",
    )
    p.add_argument("--model", metavar="DIR", help="model folder (default: the bundled model)")
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="inference backend (default onnx)")
    p.add_argument("--seconds", type=float, default=20.0, help="audio timed back to back, 1..3600 (default 20)")
    p.add_argument(
        "--paced-seconds",
        type=float,
        default=2.0,
        help="audio timed paced, one hop per 10 ms, as live runs, 0.5..600 (default 2; 0 skips it, and the verdict)",
    )
    p.add_argument("--out", metavar="JSON", help="also write the figures here (- : to stdout, the text to stderr)")
    p.set_defaults(handler=run)


def _stats(ns: np.ndarray, budget_ms: float) -> dict[str, float]:
    ms = ns / 1e6
    return {
        "hops": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "over_budget": int((ms > budget_ms).sum()),
    }


def run(args) -> int:
    from ..backends import make_backend, one_thread
    from ..engine import StreamTagger
    from ..modelfile import DEFAULT_MODEL_DIR, resolve_model_dir
    from ..sources import read_audio

    if not 1 <= args.seconds <= 3600:
        raise ConfigError(f"--seconds must be in 1..3600 ({args.seconds:g} given)")
    if not (args.paced_seconds == 0 or 0.5 <= args.paced_seconds <= 600):
        raise ConfigError(f"--paced-seconds must be 0 (no paced run) or in 0.5..600 ({args.paced_seconds:g} given)")
    if args.out and args.out != "-":
        check_output_path(args.out, "--out")
    say = functools.partial(print, file=sys.stderr if args.out == "-" else sys.stdout)  # - : stdout is the JSON
    backend = make_backend(args.backend, args.model, **one_thread(args.backend))
    folder = resolve_model_dir(args.model).resolve()  # in the JSON: where it was, not how it was typed
    feats = backend.config.features
    hop, budget_ms = feats.hop_length, feats.frame_seconds * 1000
    examples = DEFAULT_MODEL_DIR.parent / "examples"
    clips = np.concatenate([read_audio(examples / n, feats.sample_rate)[0] for n in ("dog.flac", "rain.flac")])
    n = round(args.seconds / feats.frame_seconds)  # int() of 2.3 / 0.01 is 229
    audio = np.resize(clips, (n + 100) * hop).astype(np.float32)
    tagger = StreamTagger(backend)
    for i in range(100):  # warm-up
        tagger.feed(audio[i * hop : (i + 1) * hop])
    engine_ns = np.zeros(n, np.int64)
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter_ns()
        tagger.feed(audio[(i + 100) * hop : (i + 101) * hop])
        engine_ns[i] = time.perf_counter_ns() - t0
    cpu_s = time.process_time() - cpu0
    model_ns = np.zeros(n, np.int64)
    for i in range(n):
        t0 = time.perf_counter_ns()
        backend(audio[i * hop : (i + 1) * hop])
        model_ns[i] = time.perf_counter_ns() - t0
    paced = round(args.paced_seconds / feats.frame_seconds)
    paced_ns = np.zeros(max(paced, 1), np.int64)
    next_t = time.perf_counter()
    cpu0 = time.process_time()
    for i in range(paced):  # as a microphone delivers: the core idles between hops, caches go cold
        next_t += feats.frame_seconds
        time.sleep(max(0.0, next_t - time.perf_counter()))
        t0 = time.perf_counter_ns()
        tagger.feed(audio[i * hop : (i + 1) * hop])
        paced_ns[i] = time.perf_counter_ns() - t0
    paced_cpu_s = time.process_time() - cpu0
    report = {
        "model": "bundled" if folder == DEFAULT_MODEL_DIR.resolve() else str(folder),
        "arch": backend.config.arch,
        "classes": len(backend.labels),
        "backend": args.backend,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "budget_ms": budget_ms,
        "engine": _stats(engine_ns, budget_ms),
        "model_alone": _stats(model_ns, budget_ms),
        "paced": _stats(paced_ns, budget_ms) if paced else None,
        # paced, as a live stream runs (cold caches, the wake-ups): what a stream costs; back to back is less
        "core_share_per_stream": paced_cpu_s / (paced * feats.frame_seconds) if paced else None,
        "core_share_back_to_back": cpu_s / (n * feats.frame_seconds),
    }
    worst = report["paced"]["p99_ms"] if paced else report["engine"]["p99_ms"]  # the verdict: paced, as live meets
    report["real_time"] = worst < budget_ms if paced else None  # judged only with the run live meets
    e, m = report["engine"], report["model_alone"]
    say(f"model: {report['arch']}, {report['classes']} classes, {args.backend} backend, one thread;", report["machine"])
    say(
        f"hop (model + events), back to back: p50 {e['p50_ms']:.3f} ms, p99 {e['p99_ms']:.3f} ms, "
        f"max {e['max_ms']:.3f} ms over {e['hops']} hops"
    )
    say(f"model alone: p50 {m['p50_ms']:.3f} ms, p99 {m['p99_ms']:.3f} ms")
    back_to_back = f"{report['core_share_back_to_back']:.1%} back to back, warm caches"
    if paced:
        p = report["paced"]
        paced_ms = f"p50 {p['p50_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms"
        say(f"hop, paced every {budget_ms:g} ms (cold caches, as live): {paced_ms}")
        say(f"one real-time stream takes {report['core_share_per_stream']:.1%} of a core, paced ({back_to_back})")
        verdict = "yes" if report["real_time"] else "no"
        share = f"{worst / budget_ms:.0%} of the {budget_ms:g} ms budget"
        hint = ""
        if not report["real_time"]:  # a busy machine, a short run or the slower backend: what to try next
            hint = "; other programs busy? a longer --paced-seconds measures more hops"
            hint += "; the onnx backend is faster" if args.backend != "onnx" else ""
        say(f"real time: {verdict} (paced p99 {worst:.3f} ms is {share}{hint})")
    else:
        say(f"one stream takes {back_to_back}; real time: not judged (--paced-seconds 0: no paced run)")
    if args.out == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    elif args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        say(f"report: {args.out}")
    return 1 if report["real_time"] is False else 0
