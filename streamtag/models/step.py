"""The streaming hop step: raw hop -> log-mel -> model step -> probabilities.

This is the unit both backends run: the torch backend calls it eagerly, the ONNX
backend runs its export. Audio context and model state are explicit inputs and
outputs, all batch-first, so many streams can share one call.
"""

from __future__ import annotations

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
