"""TensorFlow's start-up: GPUs hidden, its C++ notes held back at the chosen level."""

import contextlib
import os
import subprocess
import sys

import pytest

from data_pipeline.tf_setup import native_logs_held

INFO = b"I0000 00:00:1796588237.983401    7072 port.cc:153] oneDNN custom operations are on.\n"
PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
MULTILINE = (b"I0000 00:00:1796588238.027345    7072 cpu_feature_guard.cc:227] This binary is "
             b"optimized\nTo enable the following instructions: AVX2 FMA, rebuild.\n")
ERROR = b"E0000 00:00:1796588238.1    7072 cuda_dnn.cc:8] could not load cuDNN\n"


@pytest.mark.parametrize("raised, shown", [(None, False), (ValueError, False),
                                           (RuntimeError, True), (KeyboardInterrupt, False),
                                           (SystemExit, False)])
def test_held_notes_are_shown_only_for_an_unexpected_failure(raised, shown, capfd):
    """As export uses it: every note dropped, unless an exception it did not expect
    (not ``quiet_on``) might be explained by them. A Ctrl-C while TensorFlow imports
    printed its notes above "interrupted"."""
    with contextlib.suppress(ValueError, RuntimeError, KeyboardInterrupt, SystemExit):
        with native_logs_held(quiet_on=(ValueError,)):
            os.write(2, b"plain text\n" + INFO)
            if raised:
                raise raised("failed")
    err = capfd.readouterr().err.encode()
    assert err == (b"plain text\n" + INFO if shown else b"")
    os.write(2, b"after\n")  # the descriptor is back where it was
    assert capfd.readouterr().err == "after\n"


@pytest.mark.parametrize("level, kept", [(0, PREAMBLE + INFO + MULTILINE + PREAMBLE + ERROR),
                                         (1, PREAMBLE + ERROR), (2, PREAMBLE + ERROR),
                                         (3, b"")])
def test_records_below_the_level_are_dropped_with_their_continuation_lines(
        level, kept, capfd):
    with native_logs_held(min_severity=level):
        os.write(2, PREAMBLE + INFO + MULTILINE + PREAMBLE + ERROR)
    assert capfd.readouterr().err.encode() == kept


def test_text_before_any_record_is_kept_at_every_level(capfd):
    with native_logs_held(min_severity=3):
        os.write(2, b"Traceback-like text\n" + INFO)
    assert capfd.readouterr().err == "Traceback-like text\n"


def test_holding_works_without_a_python_stderr(monkeypatch, capfd):
    """Under pythonw (and some embedders) sys.stderr is None."""
    monkeypatch.setattr(sys, "stderr", None)
    with native_logs_held():
        os.write(2, INFO)
    monkeypatch.undo()
    assert capfd.readouterr().err == ""


def test_importing_tensorflow_prints_no_notes_unless_the_user_asks():
    """TF's libraries log "oneDNN custom operations are on" as they load, before they
    read TF_CPP_MIN_LOG_LEVEL; a training run's output starts with none of it."""
    code = "from data_pipeline.tf_setup import tensorflow; tensorflow()"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # As in every command: JAX, imported first, sets the level to 1 where it is unset.
    quiet = subprocess.run([sys.executable, "-c", "import jax; " + code], env=env,
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "oneDNN" not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr
