"""Compile once: JAX's persistent compilation cache, on by default.

``jax.jit`` compiles a program the first time it sees its input shapes. For the
full-width U-Net that is slow: the training step takes over a minute to compile on a
GPU (XLA also times several cuDNN algorithms per convolution there) and tens of
seconds on a CPU, and every new process paid it again. The persistent cache writes
each compiled program to disk, keyed by the program, the devices, the flags and the
versions of JAX and XLA; the next process that needs the same program loads it in a
fraction of the time. On a GPU, XLA's autotuning results are cached alongside
(``jax_persistent_cache_enable_xla_caches``), so even a new program, such as the same
step at another batch size, skips the timing of convolutions it has already tuned.

Where the cache lives, in order: the ``--compile-cache`` flag of a command (or
``enable(setting)``), the ``UNET_JAX_COMPILE_CACHE`` environment variable, JAX's own
``JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/unet-jax/jax-cache``
(``~/.cache/unet-jax/jax-cache``). The value ``off`` turns it off. The cache is
trusted code: keep it in a folder only you can write to.

``enable`` also starts a compile log: every compilation that takes at least
``LOG_MIN_S`` seconds, or that the cache spares that long, is reported with its time and
whether the cache served it, and ``stats()`` sums them for the benchmark.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

ENV = "UNET_JAX_COMPILE_CACHE"
OFF = ("off", "none", "no", "false", "0")
# Programs that compile faster are not stored. JAX's default is 1 s, but a command
# also compiles dozens of small programs (initialisation, data placement) of 0.1-1 s
# each, about 7 s of a 50 s start on a 2-core CPU; from 0.2 s up they are stored too.
MIN_COMPILE_S = 0.2
LOG_MIN_S = 1.0

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"

_state = {"dir": None, "chosen": False, "listening": False, "log": None, "named": False,
          "min_compile_s": MIN_COMPILE_S}
_stats = {"compile_s": 0.0, "programs": 0, "cache_hits": 0, "cache_misses": 0}
_last_outcome = threading.local()


class CompileCacheError(ValueError):
    """The cache folder cannot be used; the message is one line naming the fix."""


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unet-jax``, or ``~/.cache/unet-jax``: compiled programs
    (``jax-cache/``) and, with ``--cache disk``, decoded training data (``data/``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "unet-jax"


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/unet-jax/jax-cache``, or ``~/.cache/unet-jax/jax-cache``."""
    return user_cache_dir() / "jax-cache"


def resolve(setting: str | None = None) -> Path | None:
    """The cache folder that ``setting`` (a folder, 'off' or None) selects; None is off.

    Without a setting: ``UNET_JAX_COMPILE_CACHE``, then JAX's own configured folder,
    then ``default_dir()``."""
    value = setting if setting is not None else os.environ.get(ENV)
    if value is None:
        value = _jax_own_dir() or str(default_dir())
    if value.strip().lower() in OFF or not value.strip():
        return None
    return Path(value).expanduser().resolve()


def _source(setting: str | None) -> str:
    """Where ``resolve(setting)``'s folder came from, in its order, to head a message
    about it: a folder the user never typed is no flag of theirs."""
    if setting is not None:
        return "--compile-cache "
    if os.environ.get(ENV) is not None:
        return f"{ENV}="
    if _jax_own_dir():
        return "the compile cache (JAX_COMPILATION_CACHE_DIR) "
    return "the compile cache (in $XDG_CACHE_HOME or ~/.cache) "


def _jax_own_dir() -> str | None:
    """The folder JAX was told to use (``JAX_COMPILATION_CACHE_DIR`` or its config)."""
    import jax

    try:
        return getattr(jax.config, "jax_compilation_cache_dir", None) or None
    except Exception:  # a JAX whose config does not read as attributes
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


def enable(setting: str | None = None, *, min_compile_s: float = MIN_COMPILE_S,
           log=None) -> Path | None:
    """Turns the persistent cache on (or off, for 'off') before the first compilation;
    returns its folder, or None when off. Safe to call again: the last call wins.

    ``min_compile_s``: programs that compile faster are not stored. ``log``: where compile notes go (a ``print``-like function; stderr by
    default).
    """
    import jax

    path = resolve(setting)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CompileCacheError(
                f"{_source(setting)}{path}: cannot create the folder ({e.strerror}); give a "
                f"writable folder with --compile-cache DIR, or 'off' (also settable as "
                f"{ENV})") from None
        if not os.access(path, os.W_OK):
            raise CompileCacheError(f"{_source(setting)}{path}: the folder is not writable; "
                                    "give a writable folder with --compile-cache DIR, or "
                                    f"'off' (or set {ENV})")
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
        try:  # XLA's GPU autotuning results beside the programs (a no-op on a CPU)
            jax.config.update("jax_persistent_cache_enable_xla_caches",
                              "xla_gpu_per_fusion_autotune_cache_dir")
        except (AttributeError, KeyError, ValueError):  # a JAX without the option
            pass
    _state.update(dir=path, chosen=True, log=log, min_compile_s=min_compile_s, named=False)
    _listen()
    return path


def enable_default() -> Path | None:
    """``enable()`` unless the process already chose (a command's ``--compile-cache``,
    or an earlier call): what ``train_and_evaluate`` does for library users."""
    return _state["dir"] if _state["chosen"] else enable()


def current_dir() -> Path | None:
    """The folder ``enable`` chose (None: off, or ``enable`` not called)."""
    return _state["dir"]


def stats() -> dict:
    """Compilations since the process started (after ``enable``): total seconds, the
    number of programs, and how many the persistent cache served (hits) or not."""
    return dict(_stats)


def _listen() -> None:
    """Registers the JAX monitoring listeners once per process. They use JAX's public
    ``jax.monitoring`` events; where a JAX version does not emit one, the log says
    less, never fails."""
    if _state["listening"]:
        return
    from jax import monitoring

    def on_event(event, *args, **kwargs):
        if event in (_HIT, _MISS):
            _last_outcome.value = event
            _stats["cache_hits" if event == _HIT else "cache_misses"] += 1

    def on_duration(event, duration, *args, **kwargs):
        if event == _SAVED_EVENT:
            _last_outcome.saved_s = duration
        if event != _COMPILE_EVENT:
            return
        outcome = getattr(_last_outcome, "value", None)
        saved = getattr(_last_outcome, "saved_s", 0.0) if outcome == _HIT else 0.0
        _last_outcome.value, _last_outcome.saved_s = None, 0.0
        _stats["compile_s"] += duration
        _stats["programs"] += 1
        if duration >= LOG_MIN_S or saved >= LOG_MIN_S:
            name = kwargs.get("fun_name") or "a program"
            _note(_describe(name, duration, outcome, saved))

    monitoring.register_event_listener(on_event)
    monitoring.register_event_duration_secs_listener(on_duration)
    _state["listening"] = True


def _describe(name: str, duration: float, outcome, saved_s: float) -> str:
    """One line on one compilation: how long, and what the cache did."""
    if outcome == _HIT:
        return (f"{name}: loaded from the compilation cache in {duration:.1f} s "
                f"(compiling took {duration + saved_s:.1f} s)")
    if _state["dir"] is None:
        why = "the persistent compilation cache is off"
    elif outcome == _MISS:
        # The folder once; the lines after the first only say what happened.
        where = "" if _state["named"] else f" at {_state['dir']}"
        _state["named"] = True
        why = f"stored for next time in the compilation cache{where}"
    else:
        why = "the compilation cache was not consulted"
    return f"{name}: compiled in {duration:.1f} s ({why})"


def _note(message: str) -> None:
    log = _state["log"]
    if log is None:
        sys.stderr.write(f"unet-jax: {message}\n")
    else:
        log(message)
