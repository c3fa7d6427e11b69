"""One module per method family; importing this package registers all of them.

Each module defines its config (``@register_config``), its layers, and its tuner
(``@register_tuner("<PEFT_TYPE>")``), and may register a training-job builder
(``@register_method("<cli name>")`` in :mod:`tsugiki.config`). New modules here are
picked up without editing this file.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
