"""Causal attention: a transformer with a sliding-window causal mask and a KV cache.

Positions are relative (a learned bias per head and distance), never absolute, so
the model behaves the same at hour 5 as at second 1. The cache holds the keys and
values of the last ``window - 1`` frames plus a validity mask for the stream start.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import State, StreamingModel, register


class _WindowedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.rel_bias = nn.Parameter(torch.zeros(heads, window))  # by distance 0 .. window-1

    def forward(self, x, k_cache, v_cache, allowed, distance):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        keys = torch.cat([k_cache, k], dim=1)
        values = torch.cat([v_cache, v], dim=1)
        dh = d // self.heads
        # (batch, time, dim) -> (batch, heads, time, dh)
        qh = q.reshape(b, t, self.heads, dh).transpose(1, 2)
        kh = keys.reshape(b, -1, self.heads, dh).transpose(1, 2)
        vh = values.reshape(b, -1, self.heads, dh).transpose(1, 2)
        scores = qh @ kh.transpose(2, 3) / math.sqrt(dh) + self.rel_bias[:, distance]
        scores = scores.masked_fill(~allowed[:, None], -1e9)
        mixed = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(mixed)
        x = x + self.ffn(self.norm2(x))
        keep = self.window - 1
        return x, keys[:, -keep:], values[:, -keep:]


@register("attention")
class CausalAttention(StreamingModel):
    """Args:
    hidden (int): model width. (Default: ``64``)
    heads (int): attention heads. (Default: ``4``)
    layers (int): transformer blocks. (Default: ``2``)
    window (int): frames each frame attends to, itself included. (Default: ``100`` = 1 s)
    pool_seconds (list of float): running-mean time constants of the head. (Default: ``[]``)
    pool_gate (bool): a learned weight per frame on what enters those means. (Default: ``false``)
    """

    def __init__(
        self,
        n_mels: int,
        num_classes: int,
        hidden: int = 64,
        heads: int = 4,
        layers: int = 2,
        window: int = 100,
        pool_seconds: tuple[float, ...] = (),
        **common,
    ) -> None:
        super().__init__(n_mels, hidden, num_classes, tuple(pool_seconds), **common)
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if window < 2:
            raise ValueError(f"window must be at least 2 frames ({window} given)")
        self.hidden, self.window = hidden, window
        self.inp = nn.Linear(n_mels, hidden)
        self.blocks = nn.ModuleList(_WindowedBlock(hidden, heads, window) for _ in range(layers))
        # distance of each cached frame (and the new one) from the newest frame, for one-frame steps
        self.register_buffer("step_distance", torch.arange(window - 1, -1, -1)[None, :], persistent=False)

    def init_trunk_state(self, batch_size: int) -> State:
        dev, keep = self.feat_mean.device, self.window - 1
        caches = []
        for _ in self.blocks:  # separate tensors for K and V: callers may update state in place
            caches += [torch.zeros(batch_size, keep, self.hidden, device=dev) for _ in range(2)]
        return (torch.zeros(batch_size, keep, device=dev), *caches)  # validity of cached frames, then K, V per block

    def trunk(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        valid, caches = state[0], state[1:]
        b, t, _ = x.shape
        keep = self.window - 1
        valid_all = torch.cat([valid, torch.ones_like(x[:, :, 0])], dim=1)
        if t == 1:  # the streaming step: constant distances, no index arithmetic in the exported graph
            distance = self.step_distance
            allowed = valid_all[:, None, :] > 0.5
        else:
            query_pos = torch.arange(t, device=x.device)[:, None] + keep
            key_pos = torch.arange(keep + t, device=x.device)[None, :]
            distance = query_pos - key_pos  # (time, keep + time)
            in_window = (distance >= 0) & (distance < self.window)
            allowed = in_window[None] & (valid_all[:, None, :] > 0.5)  # (batch, time, keep + time)
            distance = distance.clamp(0, self.window - 1)
        y = self.inp(x)
        new_caches = []
        for i, block in enumerate(self.blocks):
            y, k, v = block(y, caches[2 * i], caches[2 * i + 1], allowed, distance)
            new_caches += [k, v]
        return y, (valid_all[:, -keep:], *new_caches)
