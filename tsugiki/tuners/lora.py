"""``peft.tuners.lora``'s names for tsugiki's LoRA classes (:mod:`tsugiki.methods.lora`):
``Linear`` is :class:`~tsugiki.methods.lora.LoraLinear`, ``Embedding`` :class:`~tsugiki.methods.lora.LoraEmbedding`."""

from ..methods.lora import LoraConfig, LoraEmbedding as Embedding, LoraLayer, LoraLinear as Linear, LoraModel

__all__ = ["LoraConfig", "LoraModel", "LoraLayer", "Linear", "Embedding"]
