"""Tests write only under their temporary directories: the sample dataset, generated
on first use, and JAX's persistent compilation cache go to session temporary folders,
never to the user's home."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _sample_data_in_a_temporary_folder(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("UNET_JAX_DATA", str(tmp_path_factory.mktemp("unet-jax-data")))
    mp.setenv("UNET_JAX_COMPILE_CACHE", str(tmp_path_factory.mktemp("jax-cache")))
    yield
    mp.undo()
