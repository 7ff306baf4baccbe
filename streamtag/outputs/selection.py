"""Which classes to show, like MediaPipe's AudioClassifier options: top-k, score threshold, allow or deny list."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, some


def split_class_names(values: Sequence[str] | None, labels: Sequence[str], where: str) -> list[str] | None:
    """Class names as a user gives them (``--allow``, a config's ``allow = "dog, rain"``): each value one class
    or several comma-separated, a label that itself holds a comma kept whole; ``None`` when none are given."""
    if not values:
        return None
    names = []
    for value in values:
        names += [value] if value in labels else [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{where} {','.join(values)!r} names no class")
    return names


def check_class_names(names: Sequence[str], labels: Sequence[str], where: str) -> None:
    """A name that is not one of the model's classes is refused in one line naming the nearest ones (a typo,
    a capital letter), or every class when none is near."""
    unknown = [n for n in names if n not in labels]
    if unknown:
        close = difflib.get_close_matches(unknown[0], labels, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"the model's classes: {some(labels, 10)}"
        raise ConfigError(f"{where}: unknown class {unknown[0]!r} ({hint})")


class ClassSelection:
    """``pick(probs) -> [(label, prob), ...]`` best first.

    Args:
        labels: all class names.
        max_results (int): keep at most this many (top-k). (Default: ``3``)
        score_threshold (float): hide classes below this probability. (Default: ``0``)
        allow / deny: class names to keep only / to hide; at most one of the two.
    """

    def __init__(
        self,
        labels: Sequence[str],
        max_results: int = 3,
        score_threshold: float = 0.0,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
    ) -> None:
        if allow and deny:
            raise ConfigError("--allow and --deny are mutually exclusive: give one of them")
        if max_results < 1:
            raise ConfigError(f"--max-results must be >= 1 ({max_results} given)")
        if not 0.0 <= score_threshold <= 1.0:
            raise ConfigError(f"--score-threshold must be in [0, 1] ({score_threshold} given)")
        self.labels = list(labels)
        named = list(allow or deny or [])
        check_class_names(named, self.labels, "--allow" if allow else "--deny")
        mask = np.ones(len(self.labels), dtype=bool)
        if allow:
            mask[:] = False
            mask[[self.labels.index(n) for n in allow]] = True
        if deny:
            mask[[self.labels.index(n) for n in deny]] = False
        self.indices = np.flatnonzero(mask)
        self.enabled = None if mask.all() else mask  # per class, whether it is shown; None: every class
        self.max_results = min(max_results, self.indices.size)
        self.score_threshold = score_threshold
        self._names = [self.labels[i] for i in self.indices]

    def pick(self, probs: np.ndarray) -> list[tuple[str, float]]:
        sub = probs if self.enabled is None else probs[self.indices]  # once per frame: no gather when unfiltered
        order = np.argsort(-sub, kind="stable")[: self.max_results]
        names = self._names
        return [(names[i], p) for i, p in zip(order.tolist(), sub[order].tolist()) if p >= self.score_threshold]
