"""Runtimes that run the hop step. Chosen once at start-up; the worker never branches on them.

A backend is one class with the :class:`Backend` shape, added to ``BACKENDS`` (the class itself, or
``"module:Class"`` to import it only when it is chosen).
Imports are lazy: the onnx backend never imports torch.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError


class Backend(Protocol):
    """Runtime side of a model. One primitive: :meth:`step` steps any subset of the streams of a state
    from :meth:`new_state`; ``backend(audio)`` and :meth:`reset_states` are a thin adapter over it for the
    backend's own ``batch_size`` streams (what a single stream's engine uses)."""

    config: ModelConfig
    labels: Sequence[str]
    folder: os.PathLike  # the model folder (its events.toml gives default event settings)
    batch_size: int

    def new_state(self, capacity: int, lockstep: bool = False) -> object:
        """State for ``capacity`` streams (opaque to callers). ``lockstep``: every step will step all of
        them together, which a backend may prepare for (onnx prebuilds the whole hop)."""

    def step(self, state: object, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """One hop for each stream in ``slots`` (distinct indices), all in one call.

        ``audio`` is ``(len(slots), hop)``; returns probabilities ``(len(slots), classes)``, valid until
        the next call. Streams not named keep their state untouched.
        """

    def step_hops(self, state: object, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of every stream of a lockstep state, ``(n, k, hop) -> (n, k, classes)``: the results of ``k``
        :meth:`step` calls (to float rounding), in as few calls as the backend can (a backlog, a file)."""

    def step_rounds(self, state: object, slots: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of the streams in ``slots`` of a pool, ``(k, n, hop) -> (k, n, classes)``: the results of ``k``
        :meth:`step` calls, the slots' state gathered and scattered once (optional: without it, ``k`` calls)."""

    def step_slot_hops(self, state: object, slot: int, audio: np.ndarray) -> np.ndarray:
        """``k`` hops of one stream of a pool, ``(k, hop) -> (k, classes)``: the results of ``k`` :meth:`step`
        calls of that slot, in as few calls as the backend can (the backlog of a stream that leaves or resets,
        which does not wait for the others' rounds). Other slots keep their state."""

    def snapshot(self, state: object, slot: int) -> list[np.ndarray]:
        """Copies of one stream's state in a pool (host arrays: it may travel to another process)."""

    def restore(self, state: object, slot: int, rows: list[np.ndarray]) -> None:
        """One stream's state back from :meth:`snapshot`, taken in any pool of the same model."""

    def clear(self, state: object, slots: Sequence[int]) -> None:
        """These streams back to a new stream's state (a stream joining, leaving or resetting)."""

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """The adapter: one hop ``(batch_size, hop)`` of the backend's own streams."""

    def steps(self, audio: np.ndarray) -> np.ndarray:
        """The adapter: ``k`` hops ``(batch_size, k, hop)`` of the own streams (:meth:`step_hops`)."""

    def reset_states(self) -> None:
        """The adapter: the own streams back to a new stream's state."""


class OwnStreams:
    """The adapter both backends share: their own ``batch_size`` streams (``_own``, slots ``_all``) stepped in
    lockstep through the primitive, what a single stream's engine calls."""

    _own: object
    _all: np.ndarray

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """One hop ``(batch_size, hop)`` of the own streams -> probabilities (valid until the next call)."""
        return self.step(self._own, self._all, audio)

    def steps(self, audio: np.ndarray) -> np.ndarray:
        """``k`` hops ``(batch_size, k, hop)`` of the own streams -> ``(batch_size, k, classes)``, as ``k`` calls."""
        return self.step_hops(self._own, audio)

    def reset_states(self) -> None:
        self.clear(self._own, self._all)


BACKENDS: dict[str, str | type] = {
    "onnx": "streamtag.backends.onnx_backend:OnnxBackend",
    "torch": "streamtag.backends.torch_backend:TorchBackend",
}


def make_backend(name: str, model: str | os.PathLike | None = None, batch_size: int = 1, **options) -> Backend:
    """Open ``model`` (a folder; the bundled default when ``None``) on the named backend."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1 ({batch_size!r} given)")
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a whole number >= 1 ({threads!r} given)")
    cls = BACKENDS[name]
    if isinstance(cls, str):
        module_name, class_name = cls.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            known = sorted(set(parameters) - {"model", "batch_size"})
            raise ConfigError(
                f"the {name} backend takes no option {', '.join(unknown)} (its options: {', '.join(known) or 'none'})"
            )
    return cls(model, batch_size=batch_size, **options)


def one_thread(name: str) -> dict:
    """Options for a backend that must use one core: a process of ``tag --jobs N`` or one live stream (onnx
    sessions are single-threaded already; torch would otherwise start a thread per core in every process)."""
    return {"threads": 1} if name == "torch" else {}
