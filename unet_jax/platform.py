"""Choosing where JAX runs, and the XLA settings that make the U-Net fast there.

Importing ``unet_jax`` changes nothing in the process. A command (or a library user
who wants the project's CPU settings) calls ``setup_platform`` once, before the first
JAX computation: XLA reads ``XLA_FLAGS`` when its backend starts, and JAX's platform
list cannot change afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

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


def _has_cuda_plugin() -> bool:
    """Whether JAX's CUDA build is installed (it may still find no GPU)."""
    for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            continue
    return False


def _backend_started() -> bool:
    """Whether JAX has started its backends in this process (False where this jax
    cannot tell)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def memory_limit(cgroup_root="/sys/fs/cgroup", cgroup_file="/proc/self/cgroup") -> int | None:
    """Bytes of memory this process may use: the machine's, or its container's limit
    where that is lower (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``, of
    its own group and every group above it, as Docker, Kubernetes, Colab and Kaggle
    set them); None where neither can be read. A container sees the whole machine's
    memory in ``sysconf``, and is killed at its own limit."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        pass
    try:
        groups = Path(cgroup_file).read_text().splitlines()
    except OSError:
        groups = []
    for line in groups:
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # the unified (v2) hierarchy
            base, name = Path(cgroup_root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(cgroup_root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        # Inside a container the group's path is often the host's, and its own
        # group is mounted at the root: both are read (the root is the last level).
        folder = base / group.strip("/")
        for level in [folder, *folder.parents]:
            if not level.is_relative_to(base):
                break
            try:
                text = (level / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit():  # v2 writes "max" for no limit
                limits.append(int(text))
    return min(limits) if limits else None


def add_cpu_xla_flags() -> None:
    """Appends the project's CPU flags to ``XLA_FLAGS``, keeping the user's own: a flag
    the user already set is left as the user set it."""
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def configure_platform(platform: str = "auto") -> None:
    """Sets XLA flags and JAX's platform list; no backend is started yet.

    The CPU flags are added when the run will be on the CPU: ``cpu``, or ``auto`` on a
    machine without JAX's CUDA build.
    """
    if platform not in PLATFORMS:
        raise PlatformError(f"--platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    if platform == "cpu" or (platform == "auto" and not _has_cuda_plugin()):
        add_cpu_xla_flags()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no page of TF's start-up notes
    # TensorFlow (the input pipeline) must never take a GPU from JAX; data_pipeline
    # hides them when it first imports TF, and here if something imported it already
    # (None in sys.modules is TF blocked from import, not imported).
    if sys.modules.get("tensorflow") is not None:
        from data_pipeline.tf_setup import tensorflow

        tensorflow()
    import jax

    if platform != "auto":
        jax.config.update("jax_platforms", "cuda" if platform == "gpu" else "cpu")


def setup_platform(platform: str = "auto") -> str:
    """Makes JAX use ``platform`` ('auto', 'cpu' or 'gpu'); returns the backend in use.

    Call once, before any JAX computation. 'auto' takes a GPU when JAX sees one.
    Raises PlatformError with a one-line explanation when 'gpu' is asked for and JAX
    has no working GPU backend, rather than silently training on the CPU.
    """
    started, flags = _backend_started(), os.environ.get("XLA_FLAGS")
    configure_platform(platform)
    import jax

    if started and os.environ.get("XLA_FLAGS") != flags:
        # XLA read XLA_FLAGS as it started: the CPU settings come too late to apply.
        log.warning("setup_platform(%r) after JAX started computing: its CPU settings "
                    "(XLA_FLAGS) apply from the next process on; call it before any JAX "
                    "computation", platform)
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


def python_command() -> str:
    """How the hints a run prints (``predict with: python -m ...``) should call this
    Python: ``python`` where that is it (an activated venv, a conda env), else its
    path, relative to the working folder when inside it: the README's first command
    runs ``.venv/bin/python`` without activating the venv, and a bare ``python`` there
    is another interpreter, without the package."""
    import shutil

    executable = Path(sys.executable)
    found = shutil.which("python")
    if found and Path(found).absolute().parent == executable.absolute().parent:
        return "python"
    try:
        return str(executable.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(executable)
