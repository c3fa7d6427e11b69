"""``python -m tsugiki.plan``: the same as ``tsugiki plan``."""

from .cli import main

raise SystemExit(main())
