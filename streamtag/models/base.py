"""The causal model protocol, the architecture registry and the parts all models share.

Every model maps log-mel ``(batch, time, n_mels)`` to logits ``(batch, time, classes)``
through ``forward(feats, state) -> (logits, state)``. Offline use passes
``init_state(batch)`` and the whole sequence; streaming passes one frame (or any
chunk) at a time and keeps the returned state. It is one code path, so streaming
equals offline for any chunking; ``step`` is ``forward`` on a single frame.

A new architecture is one class decorated with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from ..config import FeatureConfig, ModelConfig
from ..errors import ConfigError
from .level import LevelNorm

State = tuple[torch.Tensor, ...]

_REGISTRY: dict[str, type[StreamingModel]] = {}


def register(name: str) -> Callable[[type[StreamingModel]], type[StreamingModel]]:
    def add(cls: type[StreamingModel]) -> type[StreamingModel]:
        _REGISTRY[name] = cls
        cls.arch_name = name
        return cls

    return add


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def build_model(cfg: ModelConfig) -> StreamingModel:
    """Instantiate the architecture a config names (weights untrained)."""
    if cfg.arch not in _REGISTRY:
        raise ConfigError(
            f"unknown architecture '{cfg.arch}' (known: {', '.join(architectures())}); a model class of your own "
            "runs where its module is imported, or anywhere once exported to ONNX (README, Layout)"
        )
    try:
        return _REGISTRY[cfg.arch](
            n_mels=cfg.features.n_mels, num_classes=cfg.num_classes, features=cfg.features, **cfg.arch_params
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad arch_params for '{cfg.arch}': {exc}") from None


@dataclasses.dataclass(frozen=True)
class DelayLines:
    """Frame histories a model reads only at a few fixed lags (dilated convolution taps).

    Streaming them as shifted context tensors copies every cached frame on every hop;
    a runtime can instead keep one ring of ``frames`` rows per line, read the taps and
    write one row per hop. ``lags[line]`` are how many frames back each past tap is,
    ``width`` the values per frame, ``state_slice`` the entries of ``init_state()``
    the rings stand for (see :meth:`StreamingModel.step_from_taps`).
    """

    lags: tuple[tuple[int, ...], ...]
    width: int
    state_slice: slice

    @property
    def frames(self) -> int:
        """Ring length: one more than the longest lag, so the row written never is a row read."""
        return 1 + max(max(lags) for lags in self.lags)


class StreamingModel(nn.Module):
    """Base class: input normalisation, a causal trunk (subclass) and a :class:`PooledHead`."""

    arch_name = ""

    def __init__(
        self,
        n_mels: int,
        hidden: int,
        num_classes: int,
        pool_seconds: tuple[float, ...],
        features: FeatureConfig | None = None,
        level_seconds: float = 0.0,
        level_floor_db: float = -70.0,
        pool_gate: bool = False,
    ) -> None:
        """``features`` gives the hop (time constants are in seconds); ``level_seconds > 0`` adds a
        :class:`~streamtag.models.level.LevelNorm` in front (models saved before it have none);
        ``pool_gate`` lets the head learn which frames its running means keep (:class:`PooledHead`)."""
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a whole number of channels, at least 1 ({hidden!r} given)")
        features = features or FeatureConfig(n_mels=n_mels)
        # Per-band statistics of the training features, set by the trainer.
        self.register_buffer("feat_mean", torch.zeros(n_mels))
        self.register_buffer("feat_std", torch.ones(n_mels))
        self.level = LevelNorm(features, level_seconds, level_floor_db) if level_seconds else None
        self.n_level_state = self.level.n_state if self.level is not None else 0
        self.head = PooledHead(hidden, num_classes, pool_seconds, features.frame_seconds, gate=pool_gate)

    # -- subclass API --------------------------------------------------------
    def init_trunk_state(self, batch_size: int) -> State:
        raise NotImplementedError

    def trunk(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``(batch, time, n_mels)`` normalised -> ``(batch, time, hidden)``."""
        raise NotImplementedError

    # -- protocol ------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> State:
        """Trunk state, then the head's, then the level's (last, so trunk indices never move)."""
        dev = self.feat_mean.device
        level = self.level.init_state(batch_size, dev) if self.level is not None else ()
        return self.init_trunk_state(batch_size) + self.head.init_state(batch_size, dev) + level

    def normalise(self, feats: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Log-mel ``(batch, time, n_mels)`` -> the trunk's input; ``state`` is the level's entries (or none)."""
        if self.level is not None:
            feats, state = self.level(feats, state)
        return (feats - self.feat_mean) / self.feat_std, state

    def split_state(self, state: State) -> tuple[State, State, State]:
        """``init_state()``'s layout (or a suffix-compatible one) -> (trunk, head, level) entries."""
        n_level = self.n_level_state
        n_head = self.head.n_state
        end = len(state) - n_level
        return state[: end - n_head], state[end - n_head : end], state[end:]

    def forward(self, feats: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        trunk_state, head_state, level_state = self.split_state(state)
        x, level_state = self.normalise(feats, level_state)
        hidden, trunk_state = self.trunk(x, trunk_state)
        logits, head_state = self.head(hidden, head_state)
        return logits, trunk_state + head_state + level_state

    def step(self, frame: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One frame ``(batch, n_mels)`` -> logits ``(batch, classes)``."""
        logits, state = self(frame[:, None, :], state)
        return logits[:, 0], state

    # -- optional: delay-line form of the streaming step -----------------------
    def delay_lines(self) -> DelayLines | None:
        """``None`` unless the model can step from ring taps (:meth:`step_from_taps`)."""
        return None

    def step_from_taps(
        self, frame: torch.Tensor, state: State, taps: torch.Tensor
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """:meth:`step` with the delay lines read by the caller.

        ``state`` is ``init_state()`` without ``delay_lines().state_slice``; ``taps`` is
        ``(lines, batch, n_lags, width)``, the rows ``lags`` frames back. Returns logits,
        the new state (same entries) and this frame's row for every line ``(batch, lines * width)``.
        """
        raise NotImplementedError


class PooledHead(nn.Module):
    """Linear classifier on the current hidden vector plus exponential running means of it.

    Clip labels are weak (a 5 s clip says "dog" even between barks); running means
    over ``pool_seconds`` let the decision hold between sound events while staying
    bounded over hours (an EMA forgets; a cumulative mean would freeze).
    State: one ``(batch, pools, hidden)`` tensor, so a streaming step updates every
    pool in three kernels. Offline, the EMA is a chunk-wise lower-triangular matmul:
    the same recurrence.

    ``gate``: each frame enters the means scaled by a learned weight in 0..1 (one per pool,
    from the frame itself). Without it a stream's means fill with whatever it heard last,
    say seconds of a quiet room, a state no training crop starts from, and a sound after
    quiet is half as likely to be named as the same sound heard from a fresh stream; with
    it the head can let quiet frames in at weight near zero, so that after quiet the means
    have decayed towards the fresh state. The recurrence stays linear in its input, so the
    offline and chunk forms are unchanged.
    """

    chunk = 64

    def __init__(
        self,
        hidden: int,
        num_classes: int,
        pool_seconds: tuple[float, ...],
        hop_seconds: float = 0.01,
        gate: bool = False,
    ):
        super().__init__()
        self.hidden = hidden
        self.n_pools = len(pool_seconds)
        self.n_state = 1 if self.n_pools else 0
        self.pool_seconds = tuple(float(s) for s in pool_seconds)
        decay = torch.tensor([math.exp(-hop_seconds / s) for s in self.pool_seconds], dtype=torch.float64)
        self.register_buffer("decay", decay.float()[:, None], persistent=False)  # (pools, 1)
        self.register_buffer("gain", (1 - decay).float()[:, None], persistent=False)
        self._decay64 = decay
        if self.n_pools:
            self.set_chunk(self.chunk)
        self.proj = nn.Linear(hidden * (1 + self.n_pools), num_classes)
        self.gate = nn.Linear(hidden, self.n_pools) if gate and self.n_pools else None
        if self.gate is not None:  # starts open (0.95): a gate added to a trained head changes little at first
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, 3.0)

    def set_chunk(self, chunk: int) -> None:
        """Frames per block of the offline EMA (an exported chunk step evaluates up to ``chunk`` frames as one)."""
        self.chunk = chunk
        if not self.n_pools:
            return
        decay = self._decay64
        steps = torch.arange(chunk, dtype=torch.float64)
        diff = steps[:, None] - steps[None, :]
        # (pool, chunk, chunk): weight of input j in output k
        tri = torch.where(diff >= 0, (1 - decay[:, None, None]) * decay[:, None, None] ** diff.clamp(min=0), 0.0)
        powers = decay[:, None] ** (steps[None, :] + 1)  # carry of the previous output
        device = self.decay.device
        self.register_buffer("tri", tri.float().to(device), persistent=False)
        self.register_buffer("carry", powers.float().to(device), persistent=False)

    def init_state(self, batch_size: int, device: torch.device) -> State:
        if not self.n_pools:
            return ()
        return (torch.zeros(batch_size, self.n_pools, self.hidden, device=device),)

    def forward(self, hidden: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self.n_pools:
            return self.proj(hidden), ()
        if hidden.shape[1] == 1:  # streaming step
            logits, state = self.step(hidden[:, 0], state)
            return logits[:, None], state
        (prev,) = state  # (batch, pools, hidden)
        if self.gate is None:
            runs = [self._ema_chunked(hidden, prev[:, i], i) for i in range(self.n_pools)]
        else:
            weight = torch.sigmoid(self.gate(hidden))  # (batch, time, pools)
            runs = [self._ema_chunked(hidden * weight[..., i : i + 1], prev[:, i], i) for i in range(self.n_pools)]
        pooled = torch.cat(runs, dim=-1)  # (batch, time, pools * hidden), pool-major like step's flatten
        means = torch.stack([run[:, -1] for run in runs], dim=1)
        return self.proj(torch.cat([hidden, pooled], dim=-1)), (means,)

    def step(self, hidden: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One frame ``(batch, hidden)`` -> logits ``(batch, classes)``; ``forward`` on one frame uses it."""
        if not self.n_pools:
            return self.proj(hidden), ()
        # y = a * y + (1 - a) * x for every pool at once: (batch, pools, hidden)
        entering = hidden[:, None, :]
        if self.gate is not None:
            entering = entering * torch.sigmoid(self.gate(hidden))[:, :, None]
        means = self.decay * state[0] + self.gain * entering
        return self.proj(torch.cat([hidden, means.flatten(1)], dim=1)), (means,)

    def _ema_chunked(self, x: torch.Tensor, prev: torch.Tensor, i: int) -> torch.Tensor:
        outs = []
        for start in range(0, x.shape[1], self.chunk):
            part = x[:, start : start + self.chunk]
            n = part.shape[1]
            # (chunk, chunk) dot (batch, chunk, hidden) -> (batch, chunk, hidden)
            y = self.tri[i, :n, :n] @ part + self.carry[i, :n, None] * prev[:, None, :]
            outs.append(y)
            prev = y[:, -1]
        return torch.cat(outs, dim=1)
