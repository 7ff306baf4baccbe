"""Optional causal 2-D convolution front end over (time, mel): local spectral patterns, shift-tolerant in frequency.

Each layer is a 3x3 conv, causal in time (two cached past frames), followed by max
pooling over frequency only, so time resolution stays one frame per hop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import State

TIME_TAPS = 3


class CausalConv2dFront(nn.Module):
    """``(batch, time, n_mels)`` -> ``(batch, time, out_dim)``; ``channels=()`` is a plain linear layer."""

    def __init__(self, n_mels: int, out_dim: int, channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.channels = tuple(channels)
        convs, norms, width, c_in = [], [], n_mels, 1
        for c in self.channels:
            convs.append(nn.Conv2d(c_in, c, (TIME_TAPS, 3), padding=(0, 1)))
            norms.append(nn.BatchNorm2d(c))
            c_in, width = c, width // 2
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.in_channels = [1, *self.channels[:-1]]
        self.widths = [n_mels // (2**i) for i in range(len(self.channels))]
        self.proj = nn.Linear(c_in * width if self.channels else n_mels, out_dim)

    def init_state(self, batch_size: int, device) -> State:
        return tuple(
            torch.zeros(batch_size, c, TIME_TAPS - 1, w, device=device) for c, w in zip(self.in_channels, self.widths)
        )

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self.channels:
            return torch.relu(self.proj(x)), state
        y, new_state = self._convs(x.unsqueeze(1), state)  # (batch, 1, time, mels) -> (b, c, t, f)
        # (b, c, t, f) -> (b, t, c * f): one GEMM over all streams (a conv spanning all bands is slower)
        return torch.relu(self.proj(y.transpose(1, 2).flatten(2))), new_state

    def step(self, frame: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One frame ``(batch, n_mels)`` -> ``(batch, out_dim)``, written with static shapes for export."""
        if not self.channels:
            return torch.relu(self.proj(frame)), state
        y, new_state = self._convs(frame.reshape(-1, 1, 1, self.widths[0]), state)  # (batch, 1, 1, mels)
        return torch.relu(self.proj(y.flatten(1))), new_state

    def _convs(self, y: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        new_state = []
        for conv, norm, ctx in zip(self.convs, self.norms, state):
            seq = torch.cat([ctx, y], dim=2)
            new_state.append(seq[:, :, -(TIME_TAPS - 1) :])
            y = torch.relu(norm(conv(seq)))
            y = F.max_pool2d(y, kernel_size=(1, 2))  # max over pairs of mel bands: (b, c, t, f) -> (b, c, t, f // 2)
        return y, tuple(new_state)
