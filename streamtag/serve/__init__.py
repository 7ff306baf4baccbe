"""``streamtag serve``: many remote streams through one batched worker; events to clients, MQTT and a web page.

Two halves. An asyncio front (:mod:`.front`, aiohttp) speaks to the network: WebSocket streams in
(:mod:`.protocol`), JSON back, ``/metrics``, ``/healthz`` and the live page; pulled sources (:mod:`.pulled`:
ffmpeg for a URL or file, a child process for a sound card) run on its loop too. One worker (:mod:`.worker`:
a thread of the front's process, or a process of its own, :mod:`.process`) owns a
:class:`~streamtag.multistream.MultiStreamTagger`: it takes decoded audio from an inbox, steps the streams
that have hops in batched rounds (at most ``max_round_streams`` of them, those whose audio has waited
longest), and hands each step to that stream's client, to MQTT and to the metrics. The network never waits
on the model and the model never waits on the network: a client (or pulled source) sending faster than real
time is not read while ``max_backlog_s`` of its audio waits (a sound card, which cannot wait, has the excess
dropped and counted), and every sample is accounted for (received = processed + dropped + pending).

Per-stream settings (labels, event thresholds; :mod:`.config`) are changed on the worker like everything
else: ``GET``/``PUT /v1/streams/<name>/settings`` and MQTT ``<prefix>/<name>/set`` submit a command and
wait for its answer.
"""
