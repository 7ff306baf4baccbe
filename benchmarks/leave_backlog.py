#!/usr/bin/env python
"""What a stream that leaves with a backlog costs the worker: its hops not yet stepped are stepped at once,
alone (``MultiStreamTagger.leave``), before the next round of every other stream.

N streams of the bundled model each hold ``--seconds`` of audio not yet stepped, then leave one after the
other; the same backlog is stepped hop by hop (one backend call per hop, as leave did before 2026-12-04)
and on the chunk graph (``step_slot_hops``, what leave does now), one after the other in the same run.
Figures: milliseconds of CPU per leaving stream, best of three.

    python benchmarks/leave_backlog.py [--streams 50] [--seconds 2] [--out results/leave_backlog.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from streamtag.multistream import MultiStreamTagger


def _leave_all(tagger: MultiStreamTagger, audio: np.ndarray, streams: int) -> float:
    """CPU seconds to leave ``streams`` streams that each hold ``audio`` unstepped."""
    for i in range(streams):
        tagger.join(f"s{i}")
        tagger.feed(f"s{i}", audio)
    start = time.process_time()
    for i in range(streams):
        tagger.leave(f"s{i}")
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    audio = np.random.default_rng(0).standard_normal(int(args.seconds * 16000)).astype(np.float32) * 0.05
    tagger = MultiStreamTagger(capacity=args.streams, events=True)
    backend, pool = tagger.backend, tagger.pool

    def hop_by_hop(_pool, slot, hops):  # the old path: one backend call per hop
        slots = np.array([slot])
        return np.stack([backend.step(pool, slots, hops[i : i + 1])[0].copy() for i in range(len(hops))])

    chunked = backend.step_slot_hops
    _leave_all(tagger, audio[:3200], 2)  # warm: graphs opened, bindings made
    figures = {}
    for name, path in (("hop_by_hop", hop_by_hop), ("chunk_graph", chunked)):
        backend.step_slot_hops = path
        figures[name] = min(_leave_all(tagger, audio, args.streams) for _ in range(3)) / args.streams * 1000
    backend.step_slot_hops = chunked
    hops = len(audio) // tagger.hop
    print(f"{args.streams} streams leaving with {args.seconds:g} s ({hops} hops) each not yet stepped, CPU per stream:")
    for name, ms in figures.items():
        print(f"  {name:12s} {ms:8.1f} ms  ({ms / hops * 1000:.0f} us a hop)")
    print(f"  chunk graph {figures['hop_by_hop'] / figures['chunk_graph']:.1f}x faster")
    if args.out:
        row = {"streams": args.streams, "seconds": args.seconds, "ms_per_stream": figures}
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
