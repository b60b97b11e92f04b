"""How many images per second the input pipeline delivers, with and without its cache.

A training step can only be as fast as its input. ``measure_throughput`` times the
pipeline alone (no model): ``cold`` decodes and resizes every image from disk, as
without a cache or during the first epoch; ``cached`` reads decoded examples from the
in-memory cache, as every later epoch does. Compare both with the train step's
images/s from ``python -m experiments.benchmark``.
"""

from __future__ import annotations

import time

from data_pipeline.input_pipeline import InputPipeline


def _rate(pipeline: InputPipeline, epoch: int, batches: int, warmup: int) -> float:
    iterator = pipeline.epoch(epoch)
    for _ in range(warmup):
        next(iterator)
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch["image"])
        if seen >= batches * pipeline.batch_size:
            break
    return seen / (time.perf_counter() - start)


def measure_throughput(pairs, image_size, batch_size: int, *, batches: int = 20,
                       warmup: int = 2, augment: bool = False) -> dict:
    """Images/s delivered: ``cold_img_per_s`` (decode every image) and
    ``cached_img_per_s`` (after the cache is filled), plus the cache fill time."""
    batches = min(batches, len(pairs) // batch_size - warmup)
    if batches < 1:
        raise ValueError(f"need more than {(warmup + 1) * batch_size} images to measure")
    kw = dict(image_size=image_size, batch_size=batch_size, train=True, augment=augment)
    cold = _rate(InputPipeline(pairs, cache=None, **kw), 1, batches, warmup)
    cached = InputPipeline(pairs, cache="memory", **kw)
    start = time.perf_counter()
    next(cached.epoch(0))  # fills the cache: decodes every image once
    fill_s = time.perf_counter() - start
    warm = _rate(cached, 1, batches, warmup)
    return {"cold_img_per_s": cold, "cached_img_per_s": warm, "img_per_s": warm,
            "cache_fill_s": fill_s, "images": len(pairs), "batch_size": batch_size,
            "image_size": list(image_size)}
