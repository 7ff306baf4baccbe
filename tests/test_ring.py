import threading

import numpy as np
import pytest

from streamtag.errors import ConfigError
from streamtag.ring import SpscRing


def _consume(ring, out, stop, block):
    buf = np.zeros(block, dtype=np.float32)
    while True:
        n = ring.read_into(buf)
        if n:
            out.append(buf[:n].copy())
        elif stop.is_set() and ring.read_available == 0:
            return
        else:
            ring.doorbell.wait(0.001)


@pytest.mark.parametrize("capacity", [64, 1024])
def test_push_under_stress_delivers_in_order_or_counts_drops(capacity):
    rng = np.random.default_rng(1)
    ring = SpscRing(capacity)
    total = 200_000
    signal = np.arange(total, dtype=np.float32)
    got, stop = [], threading.Event()
    reader = threading.Thread(target=_consume, args=(ring, got, stop, 37))
    reader.start()
    pos = 0
    while pos < total:
        n = int(rng.integers(1, 300))
        ring.push(signal[pos : pos + n])
        pos += n
    stop.set()
    reader.join()
    received = np.concatenate(got)
    assert received.size + ring.dropped == total
    assert ring.written == received.size
    assert np.all(np.diff(received) > 0), "samples arrived out of order or twice"
    assert np.isin(received, signal).all()


def test_write_blocking_drops_nothing():
    rng = np.random.default_rng(2)
    ring = SpscRing(128)
    signal = rng.standard_normal(100_000).astype(np.float32)
    got, stop = [], threading.Event()
    reader = threading.Thread(target=_consume, args=(ring, got, stop, 50))
    reader.start()
    pos = 0
    while pos < signal.size:
        n = int(rng.integers(1, 500))
        ring.write_blocking(signal[pos : pos + n])
        pos += n
    stop.set()
    reader.join()
    assert ring.dropped == 0
    np.testing.assert_array_equal(np.concatenate(got), signal)


def test_full_ring_drops_and_counts_exactly():
    ring = SpscRing(8)
    assert ring.push(np.ones(5, np.float32)) == 5
    assert ring.push(np.ones(5, np.float32)) == 3
    assert ring.dropped == 2 and ring.read_available == 8 and ring.write_available == 0
    out = np.zeros(8, np.float32)
    assert ring.read_into(out) == 8
    assert ring.push(np.arange(6, dtype=np.float32)) == 6  # wraps around the end
    assert ring.read_into(out) == 6
    np.testing.assert_array_equal(out[:6], np.arange(6))


@pytest.mark.parametrize("bad", [0, 1, 100, 3])
def test_capacity_must_be_power_of_two(bad):
    with pytest.raises(ConfigError, match="power of 2"):
        SpscRing(bad)


def test_doorbell_wakes_reader_without_blocking_writer():
    ring = SpscRing(16)
    assert ring.doorbell.wait(0.0) is False
    for _ in range(100_000):  # far more rings than the pipe holds: the writer must never block
        ring.doorbell.ring()
    assert ring.doorbell.wait(1.0) is True
    assert ring.doorbell.wait(0.0) is False
