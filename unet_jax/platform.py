"""Choosing where JAX runs, and the XLA settings that make the U-Net fast there.

Both must happen before JAX creates its first backend: XLA reads ``XLA_FLAGS`` once,
when the backend starts, and the platform list cannot change afterwards. This module
therefore imports JAX only inside ``select_platform``.
"""

from __future__ import annotations

import os

# XLA's CPU backend (jaxlib 0.10) sends each convolution through YNNPACK by default,
# which runs the U-Net's weight-gradient convolutions at a fraction of the machine's
# GEMM speed; excluding single convolutions from YNN fusion returns them to the Eigen
# path, about 2x faster for a training step and neutral for inference.
#
# The default "concurrency optimized" scheduler orders a step so that independent
# operations can overlap, which keeps more activations and backward temporaries alive
# at once. On a CPU, whose cores the convolutions already keep busy, the memory-
# minimizing order is as fast (same step time, measured) and lowers the working memory
# of a 512x512 batch-4 training step from 5.5 to 4.9 GB (XLA's memory analysis).
#
# Both flags are specific to this jaxlib (pinned in pyproject.toml): recheck them with
# `python -m experiments.benchmark` when upgrading. They only affect the CPU backend.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                 "--xla_cpu_enable_concurrency_optimized_scheduler=false")

PLATFORMS = ("auto", "cpu", "gpu")


class PlatformError(RuntimeError):
    """The requested platform is not available on this machine."""


def apply_xla_flags(platform: str = "auto") -> None:
    """Adds the project's CPU XLA flags to ``XLA_FLAGS`` unless the user set them.

    Skipped for ``gpu``: the flags only concern the CPU backend.
    """
    if platform == "gpu":
        return
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def configure_platform(platform: str = "auto") -> None:
    """Sets XLA flags and JAX's platform list; no backend is started yet."""
    if platform not in PLATFORMS:
        raise PlatformError(f"--platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    apply_xla_flags(platform)
    import jax

    if platform != "auto":
        jax.config.update("jax_platforms", "cuda" if platform == "gpu" else "cpu")


def select_platform(platform: str = "auto") -> str:
    """Makes JAX use ``platform`` ('auto', 'cpu' or 'gpu'); returns the backend in use.

    Call before any JAX computation. 'auto' takes a GPU when JAX sees one. Raises
    PlatformError with a one-line explanation when 'gpu' is asked for and JAX has no
    working GPU backend, rather than silently training on the CPU.
    """
    configure_platform(platform)
    import jax

    try:
        backend = jax.default_backend()
    except Exception as e:  # jax raises RuntimeError or AssertionError here
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PlatformError(
            f"--platform {platform}: JAX cannot start a GPU backend ({reason}); install "
            "JAX's CUDA build with `pip install -e '.[cuda]'` on a machine with an NVIDIA "
            "GPU, or use --platform cpu") from None
    if platform == "gpu" and backend != "gpu":
        raise PlatformError(f"--platform gpu: JAX is running on {backend}, not a GPU; "
                            "use --platform cpu or install JAX's CUDA build")
    return backend
