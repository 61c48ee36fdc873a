"""Shared fixtures: one small synthetic dataset for the training tests."""

import os

import pytest

from peclr_jax import data


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A TFDS data_dir holding synthetic_hands/small (32 train images, 64 px)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  data.build_dataset("synthetic_hands", data_dir, config="small")
  return str(data_dir)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Tests compile the same tiny train steps many times: share the XLA output
  between them (and between xdist workers, through one directory)."""
  import jax  # pylint: disable=g-import-not-at-top

  cache = os.environ.get("PECLR_TEST_JAX_CACHE") or str(
    tmp_path_factory.getbasetemp().parent / "jax_cache"
  )
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
