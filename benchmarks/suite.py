"""The benchmark suite (``python benchmarks/run_benchmarks.py``): latency, cost per stream, scale, memory,
the silero-vad peer, and whole-process CPU. ``streamtag bench`` keeps only the real-time check.

Prints a Markdown table and, when given a path, writes a JSON report whose ``summary`` holds the headline
figures for the default model (one thread, onnx backend). Figures, not assertions:
machines are noisy, so nothing here fails on a slow run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamtag.backends import make_backend
from streamtag.events import EventDetector
from streamtag.modelfile import DEFAULT_MODEL_DIR
from streamtag.outputs import ClassSelection
from streamtag.sources import read_audio

EXAMPLES = DEFAULT_MODEL_DIR.parent / "examples"
PERCENTILES = (50, 90, 99, 99.9)


def _progress(stage: str) -> None:
    print(f"measuring: {stage}", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _stats(ns: np.ndarray, budget_ms: float) -> dict[str, float]:
    ms = ns / 1e6
    out = {f"p{q:g}_ms": float(np.percentile(ms, q)) for q in PERCENTILES}
    out["max_ms"] = float(ms.max())
    out["mean_ms"] = float(ms.mean())
    out.update({f"p{q:g}_of_budget": out[f"p{q:g}_ms"] / budget_ms for q in PERCENTILES})
    out["deadline_misses"] = int((ms > budget_ms).sum())
    out["real_time_factor"] = out["mean_ms"] / budget_ms
    return out


def bench_frames(
    backend_name: str, model: str | os.PathLike | None, audio: np.ndarray, frames: int, warmup: int = 200
) -> dict[str, Any]:
    """Per-frame compute on one thread: the hop step (features + model), post-processing, and total.

    Post-processing is what ``live`` and ``replay`` do after each step with default options:
    event detection on every hop, and a top-k pick for the display at its 10 updates per second.
    """
    backend = make_backend(backend_name, model)
    feats = backend.config.features
    hop, budget_ms = feats.hop_length, feats.frame_seconds * 1000
    detector = EventDetector(backend.labels, feats.frame_seconds)
    selection = ClassSelection(backend.labels, 3)
    display_every = max(1, round(0.1 / feats.frame_seconds))  # the CLI's default --rate 10
    n_hops = audio.size // hop
    step_ns = np.zeros(frames, dtype=np.int64)
    post_ns = np.zeros(frames, dtype=np.int64)
    cpu0 = 0.0
    for i in range(-warmup, frames):
        if i == 0:
            cpu0 = time.process_time()
        k = (i + warmup) % n_hops
        hop_audio = audio[k * hop : (k + 1) * hop]
        t0 = time.perf_counter_ns()
        probs = backend(hop_audio)[0]
        t1 = time.perf_counter_ns()
        detector.update(i, probs)
        if i % display_every == 0:
            selection.pick(probs)
        t2 = time.perf_counter_ns()
        if i >= 0:
            step_ns[i], post_ns[i] = t1 - t0, t2 - t1
    cpu_s = time.process_time() - cpu0
    # The hop step alone, as peers time their model call (silero-vad below): no events, no display.
    cpu0 = time.process_time()
    for i in range(frames):
        k = i % n_hops
        backend(audio[k * hop : (k + 1) * hop])
    step_cpu_s = time.process_time() - cpu0
    total = step_ns + post_ns
    return {
        "backend": backend_name,
        "frames": frames,
        "warmup_frames": warmup,
        "step": _stats(step_ns, budget_ms),
        "post": _stats(post_ns, budget_ms),
        "total": _stats(total, budget_ms),
        "cpu_ms_per_audio_s": step_cpu_s * 1000 / (frames * feats.frame_seconds),
        "cpu_ms_per_audio_s_with_post": cpu_s * 1000 / (frames * feats.frame_seconds),
        "_total_ns": total,
    }


def bench_features(model, audio: np.ndarray, frames: int, warmup: int = 200) -> dict[str, float]:
    """The log-mel stage alone: the exported step cut at its log-mel output, bound and run like the step."""
    import onnx

    from streamtag.backends.onnx_backend import _session, graph_path
    from streamtag.modelfile import load_config, resolve_model_dir

    folder = resolve_model_dir(model)
    feats = load_config(folder).features
    path = graph_path(folder)
    log_mel = next(n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Log")
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "features.onnx"
        onnx.utils.extract_model(str(path), str(cut), ["context", "audio"], [log_mel])
        session = _session(cut, 1)
    context = np.zeros((1, feats.context_length), np.float32)
    hop = np.zeros((1, feats.hop_length), np.float32)
    out = np.zeros((1, feats.n_mels), np.float32)
    binding = session.io_binding()
    for name, arr in (("context", context), ("audio", hop)):
        binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
    binding.bind_output(log_mel, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    n_hops = audio.size // feats.hop_length
    times = np.zeros(frames, np.int64)
    for i in range(-warmup, frames):
        k = (i + warmup) % n_hops
        hop[0] = audio[k * feats.hop_length : (k + 1) * feats.hop_length]
        t0 = time.perf_counter_ns()
        session.run_with_iobinding(binding)
        if i >= 0:
            times[i] = time.perf_counter_ns() - t0
    return _stats(times, feats.frame_seconds * 1000)


def bench_paced_step(model, audio: np.ndarray, frames: int) -> dict[str, float]:
    """The hop step as live use runs it: one hop every 10 ms, the thread idle in between.

    Back-to-back frames keep caches and clocks warm; a real stream leaves the core idle
    between hops, and each hop then starts cold. Both figures are reported.
    """
    backend = make_backend("onnx", model)
    feats = backend.config.features
    hop, n_hops = feats.hop_length, audio.size // feats.hop_length
    times = np.zeros(frames, np.int64)
    next_hop = time.perf_counter()
    for i in range(frames):
        next_hop += feats.frame_seconds
        time.sleep(max(0.0, next_hop - time.perf_counter()))
        k = i % n_hops
        t0 = time.perf_counter_ns()
        backend(audio[k * hop : (k + 1) * hop])
        times[i] = time.perf_counter_ns() - t0
    return _stats(times, feats.frame_seconds * 1000)


def bench_scale(model, audio: np.ndarray, sizes: list[int], calls: int) -> list[dict[str, Any]]:
    """Batched steps of N streams on one thread: cost per call and per stream-frame."""
    backend = make_backend("onnx", model)
    hop, budget_ms = backend.config.features.hop_length, backend.config.features.frame_seconds * 1000
    rows = []
    for n in sizes:
        pool, slots = backend.new_state(n), np.arange(n)
        batch = _stream_batch(audio, n, hop)
        rows.append(_time_batched(backend.step, (pool, slots, batch), calls, budget_ms))
    return rows


def _stream_batch(audio: np.ndarray, n: int, hop: int) -> np.ndarray:
    """One hop for each of ``n`` streams, each from its own place in the clip."""
    return np.stack([np.roll(audio, 997 * s)[:hop] for s in range(n)]).astype(np.float32)


def _time_batched(step, args: tuple, calls: int, budget_ms: float, warmup: int = 5) -> dict[str, Any]:
    """Time ``calls`` batched steps ``step(*args)`` (hops last in ``args``): per call, per stream-frame, real time."""
    n = len(args[-1])
    times = []
    for i in range(calls + warmup):
        t0 = time.perf_counter_ns()
        step(*args)
        if i >= warmup:
            times.append(time.perf_counter_ns() - t0)
    ms = np.array(times) / 1e6
    return {
        "streams": n,
        "call_p50_ms": float(np.percentile(ms, 50)),
        "call_p99_ms": float(np.percentile(ms, 99)),
        "us_per_stream_frame": float(np.percentile(ms, 50) * 1000 / n),
        "real_time": bool(np.percentile(ms, 99) < budget_ms),
    }


def bench_scale_gpu(model, audio: np.ndarray, sizes: list[int], calls: int) -> dict[str, Any]:
    """Batched streams on a CUDA GPU through the torch backend, until a size misses the hop.

    State stays on the GPU; each call moves the hops in and the probabilities out, as a server
    would. Empty when no GPU is visible.
    """
    import torch

    if not torch.cuda.is_available():
        return {}
    rows = []
    for n in sizes:
        backend = make_backend("torch", model, batch_size=n, device="cuda")
        hop, budget_ms = backend.config.features.hop_length, backend.config.features.frame_seconds * 1000
        batch = _stream_batch(audio, n, hop)
        rows.append(_time_batched(backend, (batch,), calls, budget_ms))  # returns host probabilities: GPU done
        del backend
        torch.cuda.empty_cache()
        if not rows[-1]["real_time"]:
            break
    real_time = [r["streams"] for r in rows if r["real_time"]]
    return {
        "device": torch.cuda.get_device_name(),
        "rows": rows,
        "streams_real_time": max(real_time) if real_time else 0,
    }


def bench_e2e_replay(model, path: Path, seconds: float) -> dict[str, float]:
    """Paced replay through the real ring and worker: last sample of a hop written -> its step emitted."""
    from streamtag.sources import WavReplaySource
    from streamtag.worker import Worker

    backend = make_backend("onnx", model)
    feats = backend.config.features
    source = WavReplaySource(
        path, feats.sample_rate, feats.hop_length, speed=1.0, repeat=max(1, int(np.ceil(seconds / 5)))
    )
    worker = Worker(source, backend, events=None)  # the model alone, as in earlier runs
    worker.start()
    worker.join()
    s = worker.summary()
    return {"e2e_p50_ms": s.e2e_p50_ms, "e2e_p99_ms": s.e2e_p99_ms, "audio_s": s.audio_seconds, "dropped": s.dropped}


def bench_e2e_mic(model, device: str, seconds: float) -> dict[str, float]:
    """Live capture for ``seconds``: last sample of a hop written by the callback -> its step emitted."""
    from streamtag.sources.device import MicrophoneSource
    from streamtag.worker import Worker

    backend = make_backend("onnx", model)
    feats = backend.config.features
    worker = Worker(MicrophoneSource(feats.sample_rate, device, feats.hop_length), backend, events=None)
    worker.start()
    time.sleep(seconds)
    worker.request_stop()
    worker.join()
    s = worker.summary()
    return {
        "device": device,
        "e2e_p50_ms": s.e2e_p50_ms,
        "e2e_p99_ms": s.e2e_p99_ms,
        "audio_s": s.audio_seconds,
        "dropped": s.dropped,
        "error": s.error,
    }


def bench_memory(model, path: Path, minutes: float) -> dict[str, float]:
    """RSS before and after replaying ``minutes`` of audio as fast as possible."""
    from streamtag.sources import WavReplaySource
    from streamtag.worker import Worker

    backend = make_backend("onnx", model)
    feats = backend.config.features
    clip_s = read_audio(path, feats.sample_rate)[0].size / feats.sample_rate
    source = WavReplaySource(
        path, feats.sample_rate, feats.hop_length, speed=0, repeat=max(1, int(round(minutes * 60 / clip_s)))
    )
    worker = Worker(source, backend, events=EventDetector(backend.labels, feats.frame_seconds))
    rss0 = _rss_mb()
    worker.start()
    peak = rss0
    while worker.is_alive():
        worker.join(0.5)
        peak = max(peak, _rss_mb())
    rss1 = _rss_mb()
    return {
        "audio_minutes": worker.frames * feats.frame_seconds / 60,
        "rss_start_mb": rss0,
        "rss_end_mb": rss1,
        "rss_peak_mb": peak,
        "rss_growth_mb": rss1 - rss0,
    }


def bench_silero(audio16k: np.ndarray, chunks: int) -> dict[str, Any]:
    """silero-vad (optional benchmark dependency) on 512-sample chunks: its wrapper and raw onnxruntime."""
    try:
        import silero_vad
    except ImportError:
        return {"available": False, "note": "pip install silero-vad to compare (never a runtime dependency)"}
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    model = silero_vad.load_silero_vad(onnx=True)
    chunk = 512
    x = torch.from_numpy(audio16k)
    n = audio16k.size // chunk
    t0 = time.process_time()
    for i in range(chunks):
        k = i % n
        model(x[k * chunk : (k + 1) * chunk], 16000)
    wrapper_cpu = time.process_time() - t0
    onnx_path = Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, 64), np.float32)
    sr = np.array(16000, dtype=np.int64)
    t0 = time.process_time()
    for i in range(chunks):
        k = i % n
        inp = np.concatenate([context, audio16k[None, k * chunk : (k + 1) * chunk]], axis=1)
        _, state = sess.run(None, {"input": inp, "state": state, "sr": sr})
        context = inp[:, -64:]
    raw_cpu = time.process_time() - t0
    audio_s = chunks * chunk / 16000
    return {
        "available": True,
        "version": getattr(silero_vad, "__version__", "?"),
        "wrapper_cpu_ms_per_audio_s": wrapper_cpu * 1000 / audio_s,
        "raw_cpu_ms_per_audio_s": raw_cpu * 1000 / audio_s,
    }


SILERO_PROCESS = """
import sys, numpy as np, soundfile as sf, torch
from silero_vad import VADIterator, load_silero_vad
torch.set_num_threads(1)
audio, rate = sf.read(sys.argv[1], dtype="float32")
vad = VADIterator(load_silero_vad(onnx=True), sampling_rate=16000)
x = torch.from_numpy(audio)
for i in range(0, x.numel() - 511, 512):
    vad(x[i : i + 512])
"""


def _child_cpu(cmd: list[str]) -> float:
    """User + system CPU seconds of one child process run to the end (its whole life: imports included)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_whole_process(model, minutes: float, tmp: Path) -> dict[str, Any]:
    """Whole processes over the same audio, CPU time measured by the kernel: ``replay --fast`` of one long
    FLAC, silero-vad's VADIterator over it (when installed), and ``tag`` of the same audio as 5 s files."""
    import soundfile as sf

    clips = np.concatenate([read_audio(EXAMPLES / n, 16000)[0] for n in ("dog.flac", "rain.flac", "chainsaw.flac")])
    n = int(minutes * 60 * 16000)
    audio = np.resize(clips, n)
    long_file = tmp / "long.flac"
    sf.write(long_file, audio, 16000)
    folder = tmp / "clips"
    folder.mkdir()
    for i in range(0, n, 5 * 16000):
        sf.write(folder / f"{i // 80000:05d}.flac", audio[i : i + 5 * 16000], 16000)
    cli = [sys.executable, "-m", "streamtag"]
    model_args = ["--model", str(model)]
    out: dict[str, Any] = {"audio_s": n / 16000}
    out["replay_fast_cpu_s"] = _child_cpu([*cli, "replay", str(long_file), "--fast", "--quiet", *model_args])
    tag = [*cli, "tag", str(folder), "--out", str(tmp / "tags"), "--jobs", "1", *model_args]
    out["tag_files_cpu_s"] = _child_cpu(tag)
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        out["silero_cpu_s"] = None
    else:
        out["silero_cpu_s"] = _child_cpu([sys.executable, "-c", SILERO_PROCESS, str(long_file)])
    if out["silero_cpu_s"]:
        out["replay_over_silero"] = out["replay_fast_cpu_s"] / out["silero_cpu_s"]
    out["tag_real_time_factor"] = out["audio_s"] / out["tag_files_cpu_s"]
    out["replay_real_time_factor"] = out["audio_s"] / out["replay_fast_cpu_s"]
    return out


def count_macs(model_dir) -> int:
    """Multiply-accumulates of one hop step: DFT, mel, and every layer's per-frame work."""
    import torch

    from streamtag.models.io import load_model

    cfg, model = load_model(model_dir)
    f = cfg.features
    macs = 2 * (f.win_length // 2) * f.n_freqs + f.n_freqs * f.n_mels  # folded DFT (features/functional.py)
    front = getattr(model, "front", None)
    if front is not None:  # 2-D convs: their weights apply at every mel position they cover
        macs += sum(conv.weight.numel() * width for conv, width in zip(front.convs, front.widths))
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):  # one output frame per hop
            macs += module.weight.numel()
        elif isinstance(module, torch.nn.LSTM):
            macs += sum(p.numel() for name, p in module.named_parameters() if name.startswith("weight"))
    if cfg.arch == "attention":
        macs += 2 * len(model.blocks) * model.window * model.hidden
    return int(macs)


def matmul_gflops() -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    return 2 * 512**3 * reps / (time.perf_counter() - t0) / 1e9


def first_probability_s() -> tuple[float, bool]:
    """Process start to first printed probability (replay, onnx); and whether torch got imported."""
    code = (
        "import sys, streamtag.cli as c; rc = c.main(sys.argv[1:]); "
        "print('TORCH', 'torch' in sys.modules, flush=True); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "replay",
            str(EXAMPLES / "dog.flac"),
            "--fast",
            "--plain",
            "--rate",
            "100",
            "--max-results",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    rest = proc.stdout.read()
    proc.wait()
    return (elapsed if first else float("nan")), "TORCH True" in rest


def _arch_models(folder: Path, model_dir) -> dict[str, Path]:
    """Each architecture at its default size with the benchmarked model's labels (random weights: speed only)."""
    import torch

    from streamtag.config import ModelConfig
    from streamtag.modelfile import load_config, resolve_model_dir
    from streamtag.models import build_model
    from streamtag.models.io import save_model

    labels = load_config(resolve_model_dir(model_dir)).labels
    out = {}
    for arch in ("lstm", "attention", "cnn"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch, labels)
        out[arch] = save_model(build_model(cfg), cfg, folder / arch)
    return out


def run(
    quick: bool = False,
    out: str | os.PathLike | None = None,
    plot: str | None = None,
    backends: tuple[str, ...] = ("onnx", "torch"),
    model=None,
    mic: str | None = None,
) -> dict[str, Any]:
    model_dir = model or DEFAULT_MODEL_DIR
    frames = 2000 if quick else 10000
    audio = np.concatenate([read_audio(EXAMPLES / n, 16000)[0] for n in ("dog.flac", "rain.flac", "chainsaw.flac")])
    budget_ms = make_backend("onnx", model_dir).config.features.frame_seconds * 1000
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "budget_ms": budget_ms,
    }
    print(f"# streamtag bench ({'quick' if quick else 'full'}), budget {budget_ms:g} ms per frame", flush=True)
    rows = []
    _progress("per-frame compute, default model")
    default = {b: bench_frames(b, model_dir, audio, frames if b == "onnx" else frames // 5) for b in backends}
    report["default_model"] = {b: {k: v for k, v in r.items() if not k.startswith("_")} for b, r in default.items()}
    if "onnx" in default:  # the stages inside the step: log-mel alone; the model is the rest
        report["default_model"]["onnx"]["features"] = bench_features(model_dir, audio, frames)
        report["default_model"]["onnx"]["paced_step"] = bench_paced_step(model_dir, audio, 100 if quick else 1000)
    rows += [("default", b, r) for b, r in default.items()]
    with tempfile.TemporaryDirectory() as tmp:
        _progress("per-frame compute, each architecture")
        archs = _arch_models(Path(tmp), model_dir)
        report["architectures"] = {}
        for arch, folder in archs.items():
            report["architectures"][arch] = {}
            for b in backends:
                r = bench_frames(b, folder, audio, frames // 2 if b == "onnx" else frames // 10)
                report["architectures"][arch][b] = {k: v for k, v in r.items() if not k.startswith("_")}
                rows.append((arch, b, r))
        report["macs_per_frame"] = {arch: count_macs(folder) for arch, folder in archs.items()}
    report["macs_per_frame"]["default"] = count_macs(model_dir)
    gflops = matmul_gflops()
    report["matmul_gflops_1_thread"] = gflops
    report["physical_limit"] = {
        name: {
            "macs": macs,
            "limit_ms": 2 * macs / (gflops * 1e9) * 1000,
            "measured_over_limit": (
                report["default_model"]["onnx"]["total"]["p50_ms"]
                if name == "default"
                else report["architectures"][name]["onnx"]["total"]["p50_ms"]
            )
            / (2 * macs / (gflops * 1e9) * 1000),
        }
        for name, macs in report["macs_per_frame"].items()
    }
    sizes = [1, 8, 32, 128] if quick else [1, 8, 32, 128, 512, 768, 896, 1024, 1280, 1536, 2048]
    _progress("batched streams")
    report["scale"] = bench_scale(model_dir, audio, sizes, 20 if quick else 100)
    real_time = [r["streams"] for r in report["scale"] if r["real_time"]]
    if "torch" in backends:
        gpu_sizes = [1, 64, 1024] if quick else [1, 64, 1024, 4096, 16384, 32768, 49152, 65536, 98304, 131072]
        gpu = bench_scale_gpu(model_dir, audio, gpu_sizes, 10 if quick else 50)
        if gpu:
            _progress(f"batched streams on {gpu['device']}")  # reported apart from the CPU figures
            report["scale_gpu"] = gpu
    _progress("end to end, paced replay")
    report["e2e_replay"] = bench_e2e_replay(model_dir, EXAMPLES / "dog.flac", 5 if quick else 30)
    if mic is not None:
        _progress(f"end to end, microphone {mic}")
        report["e2e_mic"] = bench_e2e_mic(model_dir, mic, 5 if quick else 30)
    _progress("memory over a long replay")
    report["memory"] = bench_memory(model_dir, EXAMPLES / "rain.flac", 0.5 if quick else 10)
    _progress("silero-vad side by side")
    report["silero"] = bench_silero(audio, 500 if quick else 5000)
    _progress("whole processes: replay --fast, tag, silero-vad")
    with tempfile.TemporaryDirectory() as tmp:
        report["whole_process"] = bench_whole_process(model_dir, 1 if quick else 10, Path(tmp))
    _progress("process start to first probability")
    fp, torch_imported = first_probability_s()
    report["first_probability"] = {"seconds": fp, "torch_imported": torch_imported}
    d = report["default_model"]["onnx"]
    report = {
        "summary": {
            "frame_total_p50_ms": d["total"]["p50_ms"],
            "frame_total_p99_ms": d["total"]["p99_ms"],
            "deadline_misses": d["total"]["deadline_misses"],
            "cpu_ms_per_audio_s": d["cpu_ms_per_audio_s"],
            "silero_cpu_ms_per_audio_s": report["silero"].get("wrapper_cpu_ms_per_audio_s"),
            "silero_raw_cpu_ms_per_audio_s": report["silero"].get("raw_cpu_ms_per_audio_s"),
            "streams_per_core": max(real_time) if real_time else 0,
            "e2e_p99_ms": report["e2e_replay"]["e2e_p99_ms"],
            "rss_growth_mb": report["memory"]["rss_growth_mb"],
            "first_probability_s": fp,
            "replay_over_silero_cpu": report["whole_process"].get("replay_over_silero"),
            "tag_real_time_factor": report["whole_process"]["tag_real_time_factor"],
            "machine": report["machine"],
            "date": report["date"],
        },
        **report,
    }
    print(markdown(report, rows))
    if out is not None:  # only where asked: the folder must exist
        Path(out).write_text(json.dumps(report, indent=1, default=float))
        print(f"report: {out}")
    if plot:
        plot_cdf(plot, rows, budget_ms)
        print(f"plot: {plot}")
    return report


def markdown(report: dict[str, Any], rows) -> str:
    lines = [
        "",
        "| model | backend | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | p99/budget | misses "
        "| CPU ms per audio s: step | with post |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, backend, r in rows:
        t = r["total"]
        lines.append(
            f"| {name} | {backend} | {t['p50_ms']:.3f} | {t['p90_ms']:.3f} | {t['p99_ms']:.3f} | "
            f"{t['p99.9_ms']:.3f} | {t['max_ms']:.3f} | {t['p99_of_budget']:.1%} | {t['deadline_misses']} | "
            f"{r['cpu_ms_per_audio_s']:.2f} | {r['cpu_ms_per_audio_s_with_post']:.2f} |"
        )
    d = report["default_model"].get("onnx", {})
    if d.get("features"):
        f, st, po = d["features"], d["step"], d["post"]
        lines += [
            "",
            "| default model, onnx, stages | p50 ms | p99 ms |",
            "|---|---|---|",
            f"| features (log-mel, run alone) | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} |",
            f"| hop step (features + model, one graph) | {st['p50_ms']:.3f} | {st['p99_ms']:.3f} |",
            f"| post-processing (events; top-k at 10/s) | {po['p50_ms']:.3f} | {po['p99_ms']:.3f} |",
        ]
        if d.get("paced_step"):
            pc = d["paced_step"]
            lines.append(f"| hop step, paced (idle 10 ms between hops) | {pc['p50_ms']:.3f} | {pc['p99_ms']:.3f} |")
    s = report["summary"]
    lines += ["", "| end to end (hop written -> probabilities out) | p50 ms | p99 ms |", "|---|---|---|"]
    for key, name in (("e2e_replay", "paced replay"), ("e2e_mic", "microphone")):
        if key in report:
            e = report[key]
            where = f" ({e['device']})" if "device" in e else ""
            lines.append(f"| {name}{where} | {e['e2e_p50_ms']:.3f} | {e['e2e_p99_ms']:.3f} |")
    lines += _scale_table("streams batched", report["scale"], 1)
    if "scale_gpu" in report:
        g = report["scale_gpu"]
        lines += _scale_table(f"streams batched on {g['device']} (torch)", g["rows"], 3)
    lines += ["", "| summary | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()]
    return "\n".join(lines)


def _scale_table(title: str, rows: list[dict[str, Any]], us_digits: int) -> list[str]:
    lines = ["", f"| {title} | call p50 ms | call p99 ms | us per stream-frame | real time |", "|---|---|---|---|---|"]
    return lines + [
        f"| {r['streams']} | {r['call_p50_ms']:.3f} | {r['call_p99_ms']:.3f} "
        f"| {r['us_per_stream_frame']:.{us_digits}f} | {'yes' if r['real_time'] else 'no'} |"
        for r in rows
    ]


def plot_cdf(path, rows, budget_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, backend, r in rows:
        ms = np.sort(r["_total_ns"]) / 1e6
        ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=f"{name} / {backend}")
    ax.axvline(budget_ms, color="red", ls="--", label=f"frame budget ({budget_ms:g} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("per-frame compute (ms, log scale)")
    ax.set_ylabel("fraction of frames")
    ax.legend(fontsize=7)
    ax.set_title("per-frame latency CDF, one thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
