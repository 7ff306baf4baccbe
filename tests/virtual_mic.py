"""The two virtual microphones of ../shared/VIRTUAL_MIC.md, as test helpers (no sound card needed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ALSA_DEVICE = "streamtag_vmic"


def portaudio_available() -> bool:
    try:
        import sounddevice  # noqa: F401
    except OSError:
        return False
    return True


def require_portaudio() -> None:
    if not portaudio_available():
        pytest.skip("PortAudio missing (apt-get install libportaudio2; .ci/setup installs it)")


def alsa_file_mic(folder: Path, samples: np.ndarray, devices: tuple[str, ...] = (ALSA_DEVICE,)) -> dict[str, str]:
    """Recipe A: ALSA capture devices reading ``samples`` (float32, the format we open streams in); called
    again on the same folder, it rewrites the devices a process opening ALSA afterwards finds."""
    require_portaudio()
    raw = folder / "mic.raw"
    samples.astype(np.float32).tofile(raw)
    conf = folder / "asound.conf"
    conf.write_text(
        "</usr/share/alsa/alsa.conf>\n"
        + "".join(
            f'pcm.{name} {{\n type file\n slave.pcm "null"\n file "/dev/null"\n infile "{raw}"\n format "raw"\n}}\n'
            for name in devices
        )
    )
    return {**os.environ, "ALSA_CONFIG_PATH": str(conf)}


@contextlib.contextmanager
def pulse_null_sink(rate: int = 16000):
    """Recipe B: a PulseAudio daemon with a null sink; yields ``(env, play, stop_daemon, start_daemon)``:
    ``play(samples)`` feeds the mic, the other two kill and restart the daemon (a lost device)."""
    require_portaudio()
    if not shutil.which("pulseaudio") or not shutil.which("paplay"):
        pytest.skip("pulseaudio/paplay missing (apt-get install pulseaudio pulseaudio-utils libasound2-plugins)")
    runtime = tempfile.mkdtemp(prefix="pulse-")
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    sink = f"--load=module-null-sink sink_name=vsink rate={rate} channels=1"

    def start_daemon() -> None:
        subprocess.run(
            [
                "pulseaudio",
                "--daemonize=yes",
                "--exit-idle-time=-1",
                "--disallow-exit",
                "-n",
                "--load=module-native-protocol-unix",
                sink,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )
        subprocess.run(["pactl", "set-default-source", "vsink.monitor"], env=env, check=True, timeout=30)

    start_daemon()
    players = []

    def play(samples: np.ndarray) -> None:
        raw = Path(runtime) / f"play{len(players)}.raw"
        (np.clip(samples, -1, 1) * 32767).astype("<i2").tofile(raw)
        players.append(
            subprocess.Popen(
                ["paplay", "--device=vsink", "--raw", f"--rate={rate}", "--channels=1", "--format=s16le", str(raw)],
                env=env,
                stderr=subprocess.DEVNULL,
            )
        )

    def stop_daemon() -> None:
        pid_file = Path(runtime) / "pulse" / "pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    try:
        yield env, play, stop_daemon, start_daemon
    finally:
        for p in players:
            p.kill()
        stop_daemon()
        time.sleep(0.2)
        shutil.rmtree(runtime, ignore_errors=True)


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """Wait until ``path`` has ``count`` lines (or the process died); returns the count seen."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            seen = path.read_text().count("\n")
            if seen >= count:
                break
        time.sleep(0.05)
    return seen
