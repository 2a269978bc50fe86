"""The batch job on Ray: one model (and engine) per actor, GPUs per actor where the cluster has them.

The driver keeps the manifest and writes every file (:func:`csm.batch.run.run_job`), so a Ray run
and a single-process run record the same things; actors only turn items into audio, with the
same engine and seeds as a local run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from .items import Item
from .run import Outcome, synthesize

logger = logging.getLogger(__name__)


class BatchWorker:
    """A Ray actor body: loads the model once, then synthesizes chunks of items."""

    def __init__(self, model: str, dtype: str, quantize: int | None, slots: int, voices: dict[str, str],
                 max_audio_ms: float | None = None):
        from ..generation import load
        from ..generation.engine import Engine

        self.generator = load(model, dtype=dtype, quantize=quantize)
        self.engine = Engine(self.generator, slots=slots, max_queue=4 * slots)
        self.voices, self.max_audio_ms = voices, max_audio_ms

    def run(self, items: list[Item]) -> list[Outcome]:
        return list(synthesize(self.generator, self.engine, items, self.voices, self.max_audio_ms))

    def close(self) -> None:
        self.engine.close()


def ray_outcomes(
    items: list[Item],
    *,
    address: str | None,
    workers: int,
    model: str,
    dtype: str,
    quantize: int | None = None,
    slots: int = 8,
    voices: dict[str, str] | None = None,
    max_audio_ms: float | None = None,
) -> Iterator[Outcome]:
    """Yield the outcomes of ``items`` computed by ``workers`` Ray actors (in completion order).

    Args:
        address: a Ray cluster address, or None for a local Ray started here (and stopped after).
    """
    import ray

    started = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
    actor = ray.remote(num_gpus=gpus, num_cpus=1)(BatchWorker)
    actors = [actor.remote(model, dtype, quantize, slots, dict(voices or {}), max_audio_ms) for _ in range(workers)]
    logger.info("Ray: %d actors (%d GPU each) requested after %.1f s", workers, gpus, time.perf_counter() - started)
    chunks = [items[i : i + slots] for i in range(0, len(items), slots)]
    in_flight: dict = {}
    try:
        for index, chunk in enumerate(chunks[: 2 * workers]):
            worker = actors[index % workers]
            in_flight[worker.run.remote(chunk)] = worker
        queue = chunks[2 * workers :]
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            worker = in_flight.pop(done[0])
            if queue:
                in_flight[worker.run.remote(queue.pop(0))] = worker
            yield from ray.get(done[0])
    finally:
        for worker in actors:
            ray.kill(worker)
        if owned:
            ray.shutdown()
