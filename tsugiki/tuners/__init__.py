"""HF PEFT's ``peft.tuners`` names, for code that imports layer and model classes from there
(``from peft.tuners.lora import LoraLayer`` becomes ``from tsugiki.tuners.lora import LoraLayer``).

The methods themselves live in :mod:`tsugiki.methods`, one module per family.
"""

from .lora import Embedding, Linear, LoraConfig, LoraLayer, LoraModel

__all__ = ["LoraConfig", "LoraModel", "LoraLayer", "Linear", "Embedding"]
