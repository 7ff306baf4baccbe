"""``tag --ray``: an archive tagged by a pool of Ray actors, on one machine or a cluster.

Ray is an optional extra (``pip install 'streamtag[ray]'``), imported only here. Each actor
loads the model once and keeps one batched pool of streams; a task is a batch of whole files
(never part of one), so a stream's state never crosses machines, and every actor writes its
files' outputs under ``--out`` itself (on a cluster, a path every node shares). The outputs
are exactly those of a local ``tag``: the same engine runs inside each actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .archive import Item, Outcome, tag_archive
from .errors import BackendUnavailable, ConfigError


def _ray():
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray: pip install 'streamtag[ray]'") from None
    return ray


class _Tagger:
    """The actor: one loaded model and one pool of streams, reused for every batch it is given."""

    def __init__(self, kwargs: dict) -> None:
        from .multistream import MultiStreamTagger

        self.kwargs = kwargs
        self.multi = MultiStreamTagger(
            kwargs["model"], kwargs["backend"], capacity=kwargs["width"], events=kwargs["detector"] or True
        )

    def run(self, batch: list[Item]) -> list[Outcome]:
        return tag_archive(batch, multi=self.multi, **self.kwargs)


def tag_on_ray(
    items: Sequence[Item],
    address: str,
    actors: int | None = None,
    progress: Callable[[Outcome], None] | None = None,
    **kwargs,
) -> list[Outcome]:
    """:func:`~streamtag.archive.tag_archive` over Ray actors. ``address``: ``auto`` (a Ray already running
    on this machine, else a local one started for the run) or a cluster address (``ray://host:10001``).
    ``actors``: how many (default: one per CPU Ray offers)."""
    ray = _ray()
    if any(item.opener is not None for item in items):
        raise ConfigError("--ray tags files: stdin (-) is tagged locally, without --ray")
    try:
        ray.init(
            address=None if address == "auto" else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            ignore_reinit_error=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: cannot reach a Ray cluster there ({str(exc).splitlines()[0]})") from None
    try:
        from ray.util import ActorPool

        n = actors or max(1, int(ray.available_resources().get("CPU", 1)))
        size = max(1, min(kwargs["width"], -(-len(items) // n)))  # every actor gets work, a batch fills a pool
        batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
        remote = ray.remote(num_cpus=1)(_Tagger)
        pool = ActorPool([remote.remote(kwargs) for _ in range(min(n, len(batches)) or 1)])
        outcomes: list[Outcome] = []
        for done in pool.map_unordered(lambda actor, batch: actor.run.remote(batch), batches):
            for outcome in done:
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
        return outcomes
    finally:
        ray.shutdown()
