"""Causal LSTM: a causal conv front end (cached left context) feeding an LSTM."""

from __future__ import annotations

import torch
from torch import nn

from .base import State, StreamingModel, register


@register("lstm")
class CausalLSTM(StreamingModel):
    """Args:
    hidden (int): conv channels and LSTM size. (Default: ``128``)
    layers (int): stacked LSTM layers. (Default: ``1``)
    kernel (int): conv taps over past frames. (Default: ``3``)
    pool_seconds (list of float): running-mean time constants of the head. (Default: ``[]``)
    pool_gate (bool): a learned weight per frame on what enters those means. (Default: ``false``)
    """

    def __init__(
        self,
        n_mels: int,
        num_classes: int,
        hidden: int = 128,
        layers: int = 1,
        kernel: int = 3,
        pool_seconds: tuple[float, ...] = (),
        **common,
    ) -> None:
        super().__init__(n_mels, hidden, num_classes, tuple(pool_seconds), **common)
        if kernel < 2:
            raise ValueError(f"kernel must be at least 2 frames ({kernel} given)")
        self.n_mels, self.hidden, self.layers, self.kernel = n_mels, hidden, layers, kernel
        self.conv = nn.Conv1d(n_mels, hidden, kernel)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)

    def init_trunk_state(self, batch_size: int) -> State:
        dev = self.feat_mean.device
        return (
            torch.zeros(batch_size, self.n_mels, self.kernel - 1, device=dev),  # conv context, frames
            torch.zeros(batch_size, self.layers, self.hidden, device=dev),  # h, batch first like all state
            torch.zeros(batch_size, self.layers, self.hidden, device=dev),  # c
        )

    def trunk(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        ctx, h, c = state
        # (batch, time, mels) -> (batch, mels, context + time)
        seq = torch.cat([ctx, x.transpose(1, 2)], dim=2)
        y = torch.relu(self.conv(seq)).transpose(1, 2)
        out, (h, c) = self.lstm(y, (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()))
        return out, (seq[:, :, -(self.kernel - 1) :], h.transpose(0, 1), c.transpose(0, 1))
