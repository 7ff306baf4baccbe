"""The streaming hop step: raw hop -> log-mel -> model step -> probabilities.

This is the unit both backends run: the torch backend calls it eagerly, the ONNX
backend runs its export. Audio context and model state are explicit inputs and
outputs, all batch-first, so many streams can share one call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..features import LogMel
from .base import StreamingModel


def probabilities(logits: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Logits -> what every runner reports: independent sigmoids (multi-label) or a softmax."""
    return torch.sigmoid(logits) if cfg.multi_label else torch.softmax(logits, dim=-1)


class HopStep(nn.Module):
    """``forward(audio (B, hop), context (B, win - hop), *state) -> (probs (B, C), context, *state)``."""

    def __init__(self, cfg: ModelConfig, model: StreamingModel, feature_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.cfg = cfg
        self.log_mel = LogMel(cfg.features, feature_dtype)
        self.model = model

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        context = torch.zeros(batch_size, self.cfg.features.context_length)
        return (context, *self.model.init_state(batch_size))

    def state_names(self) -> list[str]:
        return ["context"] + [f"state{i}" for i in range(len(self.model.init_state(1)))]

    def forward(self, audio: torch.Tensor, context: torch.Tensor, *state: torch.Tensor):
        frame = torch.cat([context, audio], dim=1)
        logits, new_state = self.model.step(self.log_mel(frame), state)
        hop = self.cfg.features.hop_length
        return (probabilities(logits, self.cfg), frame[:, hop:], *new_state)


class ChunkStep(nn.Module):
    """``forward(audio (B, T * hop), context, *state) -> (probs (B, T, C), context, *state)``: ``T`` hops in one call.

    The same state as :class:`HopStep` and the same arithmetic as ``T`` calls of it (the model's ``forward``
    on ``T`` frames), so a runtime can step a backlog in one call and go on hop by hop. ``T`` may be anything
    from 1 to ``max_hops``: the offline recurrences (level, pooled head) are evaluated as one block of that
    size, and the frames are cut with constant strided slices, so the exported graph has no per-``T`` part.
    """

    def __init__(self, step: HopStep, max_hops: int | None = None) -> None:
        """``max_hops``: set the model's offline block sizes to it, for an exported graph (``None``: any ``T``)."""
        super().__init__()
        self.step = step
        self.max_hops = max_hops
        model = step.model
        if max_hops is not None:
            model.head.set_chunk(max_hops)
            if model.level is not None:
                model.level.chunk = max_hops

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        return self.step.init_state(batch_size)

    def state_names(self) -> list[str]:
        return self.step.state_names()

    def frames(self, signal: torch.Tensor) -> torch.Tensor:
        """``(B, context + T * hop)`` -> ``(B, T, win)``: frame ``i`` is ``signal[i * hop : i * hop + win]``.

        The signal is cut into blocks of ``gcd(win, hop)`` samples; frame ``i`` is blocks ``i * s .. i * s + w - 1``
        (``s = hop / g``, ``w = win / g``), so the frames are ``w`` strided slices side by side, each ending a
        constant number of blocks before the end (an ``unfold`` exports as one slice per frame).
        """
        feats = self.step.cfg.features
        g = math.gcd(feats.win_length, feats.hop_length)
        s, w = feats.hop_length // g, feats.win_length // g
        blocks = signal.reshape(signal.shape[0], -1, g)
        parts = [blocks[:, k : (k - w + 1) or None : s] for k in range(w)]
        return torch.cat(parts, dim=2)

    def forward(self, audio: torch.Tensor, context: torch.Tensor, *state: torch.Tensor):
        signal = torch.cat([context, audio], dim=1)
        logits, new_state = self.step.model(self.step.log_mel(self.frames(signal)), state)
        keep = self.step.cfg.features.context_length
        return (probabilities(logits, self.step.cfg), signal[:, signal.shape[1] - keep :], *new_state)


class RingHopStep(nn.Module):
    """The hop step of a model with :class:`~streamtag.models.base.DelayLines`, rings kept by the runtime.

    ``forward(audio, context, *state, ring (rows, width), ring_taps (lines, B, lags) int64)
    -> (probs, context, *state, ring_rows (B, lines * width))``: ``state`` leaves out the
    delay-line entries; ``ring_taps`` index rows of ``ring``, so the runtime chooses the
    ring layout and writes ``ring_rows`` in place (no per-hop copy of the history).
    """

    def __init__(self, step: HopStep) -> None:
        super().__init__()
        self.step = step
        self.lines = step.model.delay_lines()
        if self.lines is None:
            raise ValueError(f"{step.model.arch_name} has no delay lines")

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        context, *state = self.step.init_state(batch_size)
        del state[self.lines.state_slice]
        return (context, *state)

    def state_names(self) -> list[str]:
        names = self.step.state_names()
        skip = range(len(names) - 1)[self.lines.state_slice]
        return [names[0]] + [n for i, n in enumerate(names[1:]) if i not in skip]

    def forward(self, audio: torch.Tensor, context: torch.Tensor, *args: torch.Tensor):
        *state, ring, ring_taps = args
        frame = torch.cat([context, audio], dim=1)
        logits, new_state, rows = self.step.model.step_from_taps(
            self.step.log_mel(frame), tuple(state), ring[ring_taps]
        )
        hop = self.step.cfg.features.hop_length
        return (probabilities(logits, self.step.cfg), frame[:, hop:], *new_state, rows)
