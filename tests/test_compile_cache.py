"""The persistent compilation cache: where it lives, and that it spares the compile."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from unet_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]

# A fresh process compiles the tiny model's train step (from abstract shapes: nothing
# else is compiled) and prints the compile time and the cache's counts.
COMPILE_TRAIN_STEP = """
import json, sys, time
from unet_jax.platform import setup_platform
setup_platform("cpu")
import jax, numpy as np
from unet_jax import compile_cache
from unet_jax.config import Config
from unet_jax.train import create_train_state, train_step
jax.config.update("jax_disable_most_optimizations", True)  # compile time out of the suite
compile_cache.enable(sys.argv[1], min_compile_s=0)
compile_cache.LOG_MIN_S = 0  # log every program, however quick this tiny one is
config = Config(base_features=4, depth=2, image_size=(32, 32), kernels="stock")
state = jax.eval_shape(lambda key: create_train_state(key, config), jax.random.key(0))
batch = {"image": jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32),
         "mask": jax.ShapeDtypeStruct((2, 32, 32, 1), np.float32)}
lowered = train_step.lower(state, batch)
start = time.perf_counter()
lowered.compile()
print(json.dumps({"compile_s": time.perf_counter() - start, **compile_cache.stats()}))
"""


def compile_in_fresh_process(cache: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", COMPILE_TRAIN_STEP, str(cache)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_a_second_process_loads_the_train_step_at_least_5x_faster(tmp_path):
    cache = tmp_path / "jax-cache"
    first, first_log = compile_in_fresh_process(cache)
    second, second_log = compile_in_fresh_process(cache)
    assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
    assert second["cache_hits"] >= 1 and second["cache_misses"] == 0
    assert second["compile_s"] * 5 <= first["compile_s"], (first, second)
    assert any(cache.iterdir())
    # the compile log names the program and what the cache did
    assert "jit(train_step): compiled in" in first_log and "stored for next time" in first_log
    assert "jit(train_step): loaded from the compilation cache" in second_log


def test_the_folder_comes_from_the_setting_the_environment_or_the_user_cache(
        tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "from-env"))
    assert compile_cache.resolve() == tmp_path / "from-env"
    assert compile_cache.resolve(str(tmp_path / "given")) == tmp_path / "given"
    assert compile_cache.resolve("off") is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "unet-jax" / "jax-cache"


def test_a_folder_that_cannot_be_made_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    from experiments import common

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(compile_cache.CompileCacheError, match="--compile-cache .*'off'"):
        compile_cache.enable(str(blocker / "cache"))
    # A folder the user never typed is named by where it came from, not as a flag.
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setattr(compile_cache, "_jax_own_dir", lambda: None)  # none set before
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(compile_cache.CompileCacheError, match=r"^the compile cache \(in "
                       r"\$XDG_CACHE_HOME or ~/.cache\) .*a-file/unet-jax/jax-cache: cannot"):
        compile_cache.enable()
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "env"))
    with pytest.raises(compile_cache.CompileCacheError,
                       match=f"^{compile_cache.ENV}=.*a-file/env: cannot"):
        compile_cache.enable()
    monkeypatch.delenv(compile_cache.ENV)
    # what every command's --compile-cache gives: a UserError, one line, exit status 2
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(common.UserError, match="--compile-cache"):
        common.start_platform("cpu", argparse.Namespace(compile_cache=str(blocker / "cache")))
