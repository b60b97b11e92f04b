"""Test-session settings.

* The sample dataset, generated on first use, goes to a session temporary folder,
  never to the user's home.
* Every test process (pytest-xdist's workers, and the commands tests start as
  subprocesses) shares one persistent XLA compilation cache in that folder: the suite
  builds the same tiny U-Nets in many processes, and compiling them is most of its
  time. Nothing is written to the user's own cache.
* XLA compiles without its backend (LLVM) optimisations: the suite's programs are tiny
  and compile for far longer than they run, and the level changes how fast the code
  runs, never what it computes. A level the caller set is kept.
* The slowest files are collected first, so that the workers start on them and share
  the short files at the end (the longest file first is what keeps the last worker
  from running alone).
"""

import os

import pytest

UNOPTIMISED = "--xla_backend_optimization_level=0"

# Before any test starts a JAX backend: XLA reads the flags once, when it starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), UNOPTIMISED]).strip()

# By their measured time on a 2-core CPU, longest first; every other file follows in
# its usual order.
SLOWEST_FIRST = ["test_benchmark.py", "test_guide.py", "test_experiments.py",
                 "test_full_resolution.py", "test_parallel.py", "test_trainer.py",
                 "test_optim.py", "test_export.py", "test_train.py", "test_models.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


def _session_root(tmp_path_factory):
    """A folder shared by every xdist worker of this session (each has its own basetemp
    below it), or the basetemp itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(autouse=True, scope="session")
def _sample_data_and_compile_cache_in_a_temporary_folder(tmp_path_factory):
    root = _session_root(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.setenv("UNET_JAX_DATA", str(tmp_path_factory.mktemp("unet-jax-data")))
    cache = root / "jax-compilation-cache"
    mp.setenv("UNET_JAX_COMPILE_CACHE", str(cache))  # commands, in-process and started
    from unet_jax import compile_cache

    compile_cache.enable(str(cache), log=lambda *a, **k: None)
    yield
    mp.undo()
