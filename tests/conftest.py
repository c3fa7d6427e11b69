"""Settings for the whole test session."""

from __future__ import annotations

import os
import tempfile

# Kernels built during the tests (tsugiki.kernels.native) go to a throwaway folder, not the user's cache.
os.environ.setdefault("TSUGIKI_CACHE_DIR", tempfile.mkdtemp(prefix="tsugiki-test-cache-"))


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama model folder with a chat tokenizer, made once per test module."""
    from helpers_data import save_model_folder

    return save_model_folder(tmp_path_factory.mktemp("tiny-model"))
