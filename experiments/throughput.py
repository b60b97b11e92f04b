"""How many images per second the input pipeline delivers, with and without its cache.

A training step can only be as fast as its input. ``measure_throughput`` times the
pipeline alone (no model): ``cold`` decodes and resizes every image from disk, as a
run without a cache does every epoch and a cached run does in its first; ``cached``
reads the decoded examples from the cache, as every later epoch does. Compare both
with the train step's images/s (``python -m experiments.benchmark``).
"""

from __future__ import annotations

import time

from data_pipeline import InputPipeline


def _rate(pipeline: InputPipeline, epoch: int, batches: int, warmup: int) -> float:
    """Images/s over ``batches`` batches of ``epoch``, after ``warmup`` untimed ones
    (which build the tf.data graph and fill the prefetch buffer)."""
    iterator = pipeline.epoch(epoch)
    for _ in range(warmup):
        next(iterator)
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), iterator):
        seen += len(batch["image"])
    elapsed = time.perf_counter() - start
    iterator.close()
    return seen / elapsed


def measure_throughput(pairs, image_size, batch_size: int, *, cache="memory",
                       batches: int = 20, warmup: int = 2, augment=False,
                       in_channels: int = 3, crop=None, scale: float = 1.0) -> dict:
    """Images/s the training pipeline delivers over ``batches`` batches.

    Returns ``cold_img_per_s`` (decoding from disk), ``cached_img_per_s`` (reading a
    filled ``cache``: 'memory' or a file prefix; None if ``cache`` is None),
    ``img_per_s`` (what training with ``cache`` sees after its first epoch),
    ``cache_fill_s`` (decoding every image once, in parallel) and the settings. With
    ``crop``, the patch-training pipeline: random crops of the images at their own
    size times ``scale``.
    """
    kw = dict(image_size=image_size, batch_size=batch_size, train=True, augment=augment,
              in_channels=in_channels, crop=crop, scale=scale)
    cold_pipeline = InputPipeline(pairs, cache=None, **kw)
    batches = min(batches, len(cold_pipeline) - warmup)
    if batches < 1:
        raise ValueError(f"{len(pairs)} images make {len(cold_pipeline)} batches of "
                         f"{batch_size}; timing needs more than {warmup} (the warm-up)")
    result = {"cold_img_per_s": _rate(cold_pipeline, 0, batches, warmup),
              "cached_img_per_s": None, "cache_fill_s": None}
    if cache is not None:
        cached = InputPipeline(pairs, cache=cache, **kw)
        start = time.perf_counter()
        cached.fill()
        result["cache_fill_s"] = time.perf_counter() - start
        result["cached_img_per_s"] = _rate(cached, 1, batches, warmup)
    result["img_per_s"] = result["cached_img_per_s"] or result["cold_img_per_s"]
    return {**result, "images": len(pairs), "batches": batches, "batch_size": batch_size,
            "image_size": list(image_size), "cache": cache,
            "crop": list(crop) if crop else None, "scale": scale}
