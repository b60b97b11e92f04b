"""TensorFlow for tf.data on the host only: it must never take a GPU.

TensorFlow reserves nearly all of a GPU's memory when it first initialises one, which
would leave nothing for JAX. Every module of this package gets TensorFlow through
``tensorflow()``, which hides the GPUs from it before any device is initialised, and
quiets its C++ start-up log unless the user chose a level.
"""

import contextlib
import os
import re
import sys
import tempfile
import warnings

_tf = None

# absl's prefix: severity, mmdd, then the time ("I0000 00:00:1796588237.983401 7072 ...").
_LOG_LINE = re.compile(rb"([IWEF])\d{4} ")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog()"
SEVERITIES = b"IWEF"  # TF_CPP_MIN_LOG_LEVEL 0, 1, 2, 3 keeps these and the ones after


def tensorflow():
    """The ``tensorflow`` module, imported on first use with its GPUs hidden.

    TF's libraries log while they load ("oneDNN custom operations are on", once per
    library), before ``TF_CPP_MIN_LOG_LEVEL`` is read, so the import runs under
    ``native_logs_held`` at that level: the notes the level promises to hide stay
    hidden, and errors still come through.
    """
    global _tf
    if _tf is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no page of CUDA/oneDNN notes
        try:
            level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
        except ValueError:
            level = 0  # TF ignores a level it cannot read; so do we
        with native_logs_held(min_severity=level) if level > 0 else contextlib.nullcontext():
            import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            # Someone initialised TF's devices before us; only warn if that took a GPU.
            if tf.config.get_visible_devices("GPU"):
                warnings.warn("TensorFlow was started before data_pipeline could hide the "
                              "GPUs from it and may hold GPU memory JAX needs; import "
                              "data_pipeline before using TensorFlow", stacklevel=2)
        _tf = tf
    return _tf


def _records(text: bytes) -> list[tuple[int, bytes]]:
    """``text`` cut into (severity index, bytes) log records: a line with absl's prefix
    and the unprefixed lines after it (a message can span lines). absl's preamble ("All
    log messages before absl::InitializeLog()...") belongs to the record after it; text
    before any record is kept whatever the level (index 4)."""
    records, preamble = [], b""
    for line in text.splitlines(keepends=True):
        prefix = _LOG_LINE.match(line)
        if prefix:
            records.append((SEVERITIES.index(prefix.group(1)), preamble + line))
            preamble = b""
        elif line.startswith(_ABSL_PREAMBLE):
            preamble += line
        elif records:
            records[-1] = (records[-1][0], records[-1][1] + line)
        else:
            records.append((len(SEVERITIES), line))
    return records


@contextlib.contextmanager
def native_logs_held(min_severity: int | None = None, quiet_on=()):
    """Holds what is written to the process's stderr (file descriptor 2) meanwhile.

    TensorFlow's C++ code (its libraries as they load, the TFLite converter) logs
    straight to the descriptor, past Python's logging. Afterwards the held text is
    written out less the log records below ``min_severity`` (an index into
    ``SEVERITIES``), or not at all when it is None. An exception of a type in
    ``quiet_on`` is treated the same (it says what went wrong itself), as is a stop
    (Ctrl-C, SIGTERM, ``sys.exit``); any other exception writes out everything, whose
    cause the notes may tell.
    """
    def flush():
        if sys.stderr is not None:  # None under pythonw and some embedders
            sys.stderr.flush()

    flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    try:
        held = tempfile.TemporaryFile()
    except OSError:  # no room for a temporary file: let the notes through
        os.close(saved)
        yield
        return
    keep_all = False
    with held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except quiet_on:
            raise
        except Exception:
            keep_all = True
            raise
        # KeyboardInterrupt, SystemExit and SIGTERM's exception pass as if nothing was
        # raised: a stop, not a failure whose cause the notes might tell.
        finally:
            flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = b"".join(record for severity, record in _records(held.read())
                            if keep_all or (min_severity is not None
                                            and severity >= min_severity))
            if text:
                os.write(2, text)
