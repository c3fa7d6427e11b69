"""Settings for the whole test session."""

from __future__ import annotations

import os
import tempfile

# Kernels built during the tests (tsugiki.kernels.native) go to a throwaway folder, not the user's cache.
os.environ.setdefault("TSUGIKI_CACHE_DIR", tempfile.mkdtemp(prefix="tsugiki-test-cache-"))
