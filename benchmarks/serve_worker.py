#!/usr/bin/env python
"""The serve worker's own cost per stream, with no network: how many streams its thread could carry.

``benchmarks/serve.py`` measures the whole server, and on a small machine its figures mix the worker,
the network front and the load generator competing for the cores and for Python's one lock. This runs
the worker's path alone in one thread: N streams joined to a :class:`~streamtag.serve.worker.ServeWorker`;
every 100 ms of audio each stream gets one message (the bundled clips, at random offsets), and the
streams arrive in ``--groups`` rounds, as a server's clients do (a fifth of them per round by default).
A round is what the worker does: take the messages, step every ready hop in batched model calls,
detect events, build the scores messages. It prints the time per stream-message (100 ms of one stream)
and the streams one core's worker would carry in real time; the best of five repeats.

    python benchmarks/serve_worker.py --streams 100,200,500 [--groups 5] [--out results/serve_worker.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _pcm  # noqa: E402  (the same clips as the server benchmark)


def measure(n: int, groups: int, pcm: np.ndarray, repeats: int = 5, rounds: int = 8) -> dict:
    from streamtag.multistream import MultiStreamTagger
    from streamtag.serve.worker import Metrics, ServeOptions, ServeWorker

    multi = MultiStreamTagger(capacity=n)
    worker = ServeWorker(multi, ServeOptions(capacity=n))
    worker.metrics = Metrics(lambda: worker.accounts)
    messages = [0]

    def listener(message) -> None:
        messages[0] += 1

    names = [f"s{i}" for i in range(n)]
    for name in names:
        worker._handle(("join", name, 16000, listener))
    chunk = 1600
    offsets = np.random.default_rng(0).integers(0, pcm.size - chunk * (repeats * rounds + 2), n)

    def one_period(k: int) -> None:  # 100 ms of audio for every stream, in `groups` rounds
        for g in range(groups):
            for i in range(g, n, groups):
                audio = pcm[offsets[i] + k * chunk : offsets[i] + (k + 1) * chunk]
                worker._handle(("audio", names[i], audio, time.perf_counter()))
            for name, item in multi.step_blocks():
                worker._deliver(name, item)

    one_period(0)  # warm: bindings, caches
    best, k = float("inf"), 1
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(rounds):
            one_period(k)
            k += 1
        best = min(best, (time.perf_counter() - t0) / rounds)
    per_message_us = best / n * 1e6
    return {
        "streams": n,
        "groups": groups,
        "us_per_stream_message": per_message_us,
        "core_share_per_stream": best / 0.1 / n,
        "streams_per_core": int(0.1 / (best / n)),
        "messages_out": messages[0],
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="100,200,500", help="comma-separated stream counts (default 100,200,500)")
    p.add_argument("--groups", type=int, default=5, help="rounds the streams' messages arrive in (default 5)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    pcm = (_pcm().astype(np.float32) / 32768.0).astype(np.float32)
    pcm = np.resize(pcm, max(pcm.size, 16000 * 60))
    rows = []
    print("| streams | us per stream and 100 ms | share of a core per stream | streams one core's worker carries |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.streams.split(",")):
        row = measure(n, args.groups, pcm)
        rows.append(row)
        print(
            f"| {n} | {row['us_per_stream_message']:.1f} | {row['core_share_per_stream']:.3%} "
            f"| {row['streams_per_core']} |",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
