"""Causal CNN: dilated causal convolutions, each with its own cached left context."""

from __future__ import annotations

import torch
from torch import nn

from .base import DelayLines, State, StreamingModel, register
from .frontend import CausalConv2dFront


@register("cnn")
class CausalCNN(StreamingModel):
    """Args:
    hidden (int): channels. (Default: ``64``)
    dilations (list of int): one residual conv block per entry; receptive field
        ``1 + (kernel - 1) * sum(dilations)`` frames. (Default: ``[1, 2, 4, 8, 16]``)
    kernel (int): taps per conv. (Default: ``3``)
    pool_seconds (list of float): running-mean time constants of the head. (Default: ``[]``)
    pool_gate (bool): a learned weight per frame on what enters those means. (Default: ``false``)
    front_channels (list of int): channels of a causal 2-D conv front end; ``[]`` is a linear one. (Default: ``[]``)
    """

    def __init__(
        self,
        n_mels: int,
        num_classes: int,
        hidden: int = 64,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 16),
        kernel: int = 3,
        pool_seconds: tuple[float, ...] = (),
        front_channels: tuple[int, ...] = (),
        **common,
    ) -> None:
        if not (isinstance(kernel, int) and kernel >= 2):
            raise ValueError(f"kernel must be a whole number of at least 2 frames ({kernel!r} given)")
        super().__init__(n_mels, hidden, num_classes, tuple(pool_seconds), **common)
        self.hidden, self.kernel, self.dilations = hidden, kernel, tuple(dilations)
        self.front = CausalConv2dFront(n_mels, hidden, tuple(front_channels))
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, dilation=d) for d in self.dilations)
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in self.dilations)

    def context_frames(self, dilation: int) -> int:
        return (self.kernel - 1) * dilation

    def init_trunk_state(self, batch_size: int) -> State:
        dev = self.feat_mean.device
        # Time-major (batch, frames, channels): shifting the context and picking taps copy whole rows.
        convs = tuple(torch.zeros(batch_size, self.context_frames(d), self.hidden, device=dev) for d in self.dilations)
        return self.front.init_state(batch_size, dev) + convs

    def delay_lines(self) -> DelayLines:
        n_front = len(self.front.channels)
        # the past taps of each layer, oldest first: t - (kernel - 1) d, ..., t - d
        lags = tuple(tuple(j * d for j in range(self.kernel - 1, 0, -1)) for d in self.dilations)
        return DelayLines(lags, self.hidden, slice(n_front, n_front + len(self.dilations)))

    def step_from_taps(
        self, frame: torch.Tensor, state: State, taps: torch.Tensor
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        n_front = len(self.front.channels)
        _, head_state, level_state = self.split_state(state)
        x, level_state = self.normalise(frame[:, None], level_state)
        y, front_state = self.front.step(x[:, 0], state[:n_front])  # (batch, hidden)
        # static reshape sizes (lines, -1, past width): one Reshape node in the exported graph
        y, rows = self._step_layers(y, taps.reshape(len(self.convs), -1, (self.kernel - 1) * self.hidden))
        logits, head_state = self.head.step(y, head_state)
        return logits, front_state + head_state + level_state, rows

    def _step_layers(self, y: torch.Tensor, past_taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The streaming step of every conv layer, for the ring-fed graph and the torch step alike.

        ``y`` is the front end's frame ``(batch, hidden)``; ``past_taps`` ``(lines, batch, (kernel - 1) * hidden)``
        each layer's input ``(kernel - 1) d .. d`` frames back, oldest first. Returns the trunk's output and
        each layer's input this frame ``(batch, lines * hidden)`` (the rows its history keeps).
        """
        weights, biases = zip(*(self._folded(conv, norm) for conv, norm in zip(self.convs, self.norms)))
        weight = torch.stack(weights)  # (lines, taps * hidden, hidden), tap-major rows: oldest tap first, t last
        n_past = (self.kernel - 1) * self.hidden
        # Every layer's past taps are known before the hop: one batched GEMM for all of them.
        lines = len(self.convs)  # static reshape sizes: one Reshape node in the exported graph
        past = past_taps @ weight[:, :n_past] + torch.stack(biases)[:, None, :]
        # (lines, batch, hidden) -> per line (batch, hidden): split along hidden, no squeezes
        past = past.transpose(0, 1).reshape(-1, lines * self.hidden).split(self.hidden, dim=1)
        rows = []
        for i in range(lines):
            rows.append(y)  # a conv layer's history is its input
            y = y + torch.relu(torch.addmm(past[i], y, weight[i, n_past:]))  # one fused Gemm + Relu in onnxruntime
        return y, torch.cat(rows, dim=1)

    def trunk(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        n_front = len(self.front.channels)
        y, front_state = self.front(x, state[:n_front])  # (batch, time, hidden)
        contexts = state[n_front:]
        if y.shape[1] == 1 and not self.training:  # streaming: the same layer step as the exported graph
            past = torch.stack([ctx[:, ::d].flatten(1) for ctx, d in zip(contexts, self.dilations)])
            out, rows = self._step_layers(y[:, 0], past)
            new_contexts = tuple(
                torch.cat([ctx[:, 1:], row[:, None]], dim=1) for ctx, row in zip(contexts, rows.split(self.hidden, 1))
            )
            return out[:, None], tuple(front_state) + new_contexts
        new_state = list(front_state)
        for conv, norm, ctx, d in zip(self.convs, self.norms, contexts, self.dilations):
            seq = torch.cat([ctx, y], dim=1)
            new_state.append(seq[:, -self.context_frames(d) :])
            y = y + torch.relu(norm(conv(seq.transpose(1, 2)))).transpose(1, 2)
        return y, tuple(new_state)

    @staticmethod
    def _folded(conv: nn.Conv1d, norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv and eval-mode batch norm as one ``(taps * in, out)`` matrix (tap-major rows) and a bias."""
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        c_out, c_in, taps = conv.weight.shape
        weight = (conv.weight * scale[:, None, None]).permute(2, 1, 0).reshape(taps * c_in, c_out)
        return weight, (conv.bias - norm.running_mean) * scale + norm.bias
