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
        return (torch.softmax(logits, dim=-1), frame[:, hop:], *new_state)
