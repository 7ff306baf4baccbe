#!/usr/bin/env python
"""`streamtag tag` throughput: one long file vs many files, 1 and 2 local processes, Ray with 1 and 2 actors.

Builds ``--minutes`` of audio from the bundled clips, as one FLAC and as 5 s FLAC files, and tags them
as whole processes. Reports wall time, the CPU time the kernel counts for the process and its
children, and audio seconds per wall second and per CPU second, beside ``replay --fast`` of the long
file. Ray rows need ``pip install 'streamtag[ray]'`` and include starting Ray. In-process rows split the
cost: decoding alone, the model alone on the chunk graph (what ``tag`` runs) and hop by hop (what a live
stream runs), and a process that only starts.

Every figure is the median of ``--repeat`` runs (default 3): one run of a sub-second process moves by
10-20% on a shared VM.

    python benchmarks/archive.py [--minutes 10] [--repeat 3] [--out results/archive.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

EXAMPLES = Path(__file__).resolve().parents[1] / "streamtag" / "assets" / "examples"


def timed(cmd: list[str], repeat: int = 1) -> tuple[float, float]:
    """Median wall and CPU seconds (user + system of the process and everything it started) of a command."""
    runs = [_timed_once(cmd) for _ in range(repeat)]
    return float(np.median([w for w, _ in runs])), float(np.median([c for _, c in runs]))


def _timed_once(cmd: list[str]) -> tuple[float, float]:
    # an installed package runs from compiled bytecode (pip writes it); a shell that forbids writing it would
    # have every run compile the package again, about 0.04 s of CPU a process that no user pays
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=7200, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def in_process(path: Path, n: int, cli: list[str], repeat: int) -> list[dict]:
    """CPU seconds of the parts, measured in this process (``time.process_time``) on the same long file."""
    from streamtag.backends import make_backend

    def cpu(fn) -> float:
        seconds = []
        for _ in range(repeat):
            t0 = time.process_time()
            fn()
            seconds.append(time.process_time() - t0)
        return float(np.median(seconds))

    audio = sf.read(path, dtype="float32")[0]
    hops = audio[: audio.size // 160 * 160].reshape(1, -1, 160)
    chunk, single = make_backend("onnx"), make_backend("onnx")
    chunk.steps(hops[:, :200])  # opened and warm
    parts = [
        ("decode the FLAC (soundfile)", cpu(lambda: sf.read(path, dtype="float32"))),
        ("model only, chunk graph (tag, replay --fast)", cpu(lambda: chunk.steps(hops))),
        ("model only, hop by hop (live)", cpu(lambda: [single(hops[:, i]) for i in range(hops.shape[1])])),
    ]
    wall, start = timed([*cli, "--help"], repeat)
    parts.append(("a process that starts and exits (streamtag --help)", start))
    rows = []
    for name, seconds in parts:
        rows.append({"run": name, "cpu_s": seconds, "audio_s": n / 16000})
        print(f"| {name} | | {seconds:.2f} | | {n / 16000 / seconds:.0f} |", flush=True)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=3, help="runs of each row; the median is reported (default 3)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    from streamtag.sources import read_audio

    clips = np.concatenate([read_audio(EXAMPLES / n, 16000)[0] for n in ("dog.flac", "rain.flac", "chainsaw.flac")])
    n = int(args.minutes * 60 * 16000)
    audio = np.resize(clips, n)
    cli = [sys.executable, "-m", "streamtag"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        long_file, folder = tmp / "long.flac", tmp / "clips"
        sf.write(long_file, audio, 16000)
        folder.mkdir()
        for i in range(0, n, 80000):
            sf.write(folder / f"{i // 80000:05d}.flac", audio[i : i + 80000], 16000)
        tag = [*cli, "tag", "--force"]  # each row runs --repeat times: a rerun without --force skips its files
        runs = [
            ("replay --fast, one file", [*cli, "replay", str(long_file), "--fast", "--quiet"]),
            ("tag, one file", [*tag, str(long_file), "--out", str(tmp / "o1"), "--jobs", "1"]),
            (
                "tag, 5 s files, 1 process",
                [*tag, str(folder), "--out", str(tmp / "o2"), "--jobs", "1"],
            ),
            (
                "tag, 5 s files, 2 processes",
                [*tag, str(folder), "--out", str(tmp / "o3"), "--jobs", "2"],
            ),
        ]
        try:
            import ray  # noqa: F401

            for k in (1, 2):
                out = str(tmp / f"ray{k}")
                runs.append(
                    (
                        f"tag --ray auto, {k} actor(s)",
                        [*tag, str(folder), "--out", out, "--ray", "auto", "--jobs", str(k)],
                    )
                )
        except ImportError:
            print("(Ray rows skipped: pip install 'streamtag[ray]')")
        print(f"{args.minutes:g} minutes of audio; {n // 80000 + (n % 80000 > 0)} files of 5 s")
        print("| run | wall s | CPU s | x real time per wall s | per CPU s |")
        print("|---|---|---|---|---|")
        for name, cmd in runs:
            wall, cpu = timed(cmd, args.repeat)
            row = {"run": name, "wall_s": wall, "cpu_s": cpu, "audio_s": n / 16000}
            rows.append(row)
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {n / 16000 / wall:.0f} | {n / 16000 / cpu:.0f} |", flush=True)
        rows += in_process(long_file, n, cli, args.repeat)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
