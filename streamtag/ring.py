"""Single-producer single-consumer lock-free ring of float32 samples.

Contract: exactly one writer (the audio callback, or a replay thread) and one
reader (the worker). The writer only ever advances ``_write_count``, the reader
only ``_read_count``; both are monotonic Python ints, so each side reads the other's
counter as a plain attribute load (atomic under the GIL) and never takes a lock.

Why not ``queue.Queue``: ``put`` takes a lock the consumer may hold and allocates
a list node per item; a PortAudio callback must do neither. The storage here is
allocated once; ``push`` copies into it (at most two slices) and returns.

When the ring is full, :meth:`push` drops the overflow and counts it (live audio
cannot wait), while :meth:`write_blocking` waits for space (fast replay, where
nothing may be lost). :class:`Doorbell` wakes the reader without making the
writer wait: one non-blocking ``os.write`` to a pipe.
"""

from __future__ import annotations

import collections
import os
import select
import time

import numpy as np

from .errors import ConfigError


class SpscRing:
    """Preallocated ring of ``capacity`` float32 samples (a power of two).

    Args:
        capacity (int): samples the ring holds; rounded checks are cheap with a power of two.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 2 or capacity & (capacity - 1):
            raise ConfigError(f"ring capacity must be a power of 2 ({capacity} given)")
        self.capacity = capacity
        self._mask = capacity - 1
        self._buffer = np.zeros(capacity, dtype=np.float32)
        self._write_count = 0  # written by the producer only
        self._read_count = 0  # written by the consumer only
        self._dropped = 0  # written by the producer only
        # where samples were dropped: (samples written before the drop, samples dropped), appended by the producer
        # (deque.append is atomic), taken by the reader once it has read up to there: the gap's place in the stream
        # (bounded: a reader that never looks at them, serve's sound card pipe, holds a few KB at most)
        self.gaps: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        self.last_write_ns = 0  # perf_counter_ns of the latest publish, for end-to-end latency
        self.doorbell = Doorbell()

    # -- counters, readable from either side --------------------------------
    @property
    def written(self) -> int:
        """Samples accepted into the ring since creation."""
        return self._write_count

    @property
    def read(self) -> int:
        """Samples taken out by the reader since creation."""
        return self._read_count

    @property
    def dropped(self) -> int:
        """Samples refused by :meth:`push` because the ring was full."""
        return self._dropped

    @property
    def read_available(self) -> int:
        return self._write_count - self._read_count

    @property
    def write_available(self) -> int:
        return self.capacity - (self._write_count - self._read_count)

    # -- producer side -------------------------------------------------------
    def push(self, samples: np.ndarray) -> int:
        """Copy as many samples as fit; count the rest as dropped. Never blocks.

        Returns the number of samples written. Safe to call from an audio callback.
        """
        n = samples.shape[0]
        accepted = min(n, self.capacity - (self._write_count - self._read_count))
        if accepted:
            self._copy_in(samples, accepted)
        if accepted < n:
            self._dropped += n - accepted
            self.gaps.append((self._write_count, n - accepted))
        self.doorbell.ring()
        return accepted

    def write_blocking(self, samples: np.ndarray, stop_flag=None, poll_s: float = 0.001) -> int:
        """Write every sample, waiting for space; for replay, where nothing may be dropped.

        ``stop_flag`` (a ``threading.Event``) aborts the wait; returns samples written.
        """
        done = 0
        n = samples.shape[0]
        while done < n:
            room = self.capacity - (self._write_count - self._read_count)
            if room == 0:
                if stop_flag is not None and stop_flag.is_set():
                    break
                time.sleep(poll_s)
                continue
            take = min(room, n - done)
            self._copy_in(samples[done:], take)
            done += take
            self.doorbell.ring()
        return done

    def _copy_in(self, samples: np.ndarray, count: int) -> None:
        start = self._write_count & self._mask
        first = min(count, self.capacity - start)
        self._buffer[start : start + first] = samples[:first]
        if count > first:
            self._buffer[: count - first] = samples[first:count]
        self._write_count += count  # publish only after the data is in place
        self.last_write_ns = time.perf_counter_ns()

    # -- consumer side -------------------------------------------------------
    def read_into(self, out: np.ndarray) -> int:
        """Copy up to ``len(out)`` samples into ``out``; returns how many were read."""
        count = min(out.shape[0], self._write_count - self._read_count)
        if count:
            start = self._read_count & self._mask
            first = min(count, self.capacity - start)
            out[:first] = self._buffer[start : start + first]
            if count > first:
                out[first:count] = self._buffer[: count - first]
            self._read_count += count  # release the space only after copying out
        return count


class Doorbell:
    """Wakes the reader from the writer side without ever making the writer wait.

    ``ring()`` is one non-blocking ``os.write`` of one byte (a full pipe means the
    reader is already due to wake, so the byte is simply skipped). ``wait(timeout)``
    blocks in ``select`` and drains the pipe.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def ring(self) -> None:
        if self._write_fd < 0:
            return
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass

    def wait(self, timeout_s: float) -> bool:
        """Block until rung or until ``timeout_s``; True if it was rung."""
        ready, _, _ = select.select([self._read_fd], [], [], timeout_s)
        if not ready:
            return False
        try:
            while os.read(self._read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        return True

    def close(self) -> None:
        fds, self._read_fd, self._write_fd = (self._read_fd, self._write_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:
        self.close()
