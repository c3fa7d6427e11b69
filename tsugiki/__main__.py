"""``python -m tsugiki ...`` (also what ``torchrun -m tsugiki train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
