"""What each adapter layer holds and does: HF PEFT's ``get_layer_status`` / ``get_model_status``.

A layer's ``requires_grad`` per adapter is True or False when all its parameters agree, else
``"irregular"``; the model's fields are the layers' when every layer agrees, else ``"irregular"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

from .tuner import AdapterLayer, BaseTuner, ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Irregular]


def _agreed(values: list) -> Union[bool, Irregular]:
    return True if all(values) else False if not any(values) else "irregular"


def _adapter_parameters(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each adapter's own parameters in one adapter layer (or one modules_to_save wrapper)."""
    if isinstance(module, ModulesToSaveWrapper):
        return {name: list(copy.parameters()) for name, copy in module.modules_to_save.items()}
    found: dict[str, list[nn.Parameter]] = {}
    for attr in module.adapter_param_names:
        for name, holder in getattr(module, attr).items():
            params = [holder] if isinstance(holder, nn.Parameter) else list(holder.parameters())
            found.setdefault(name, []).extend(params)
    return found


def _quantization(module: nn.Module) -> Optional[str]:
    base = getattr(module, "base_layer", None) or getattr(module, "original_module", None)
    kind = type(base).__name__
    return {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}.get(kind)


def _tuner(model: nn.Module) -> nn.Module:
    from .model import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer of ``model`` (a PeftModel, or a model with
    layers grafted by ``inject_adapter_in_model``). Raises ValueError when there are none."""
    statuses = []
    for name, module in _tuner(model).named_modules():
        if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue
        params = _adapter_parameters(module)
        merged = list(getattr(module, "merged_adapters", []))
        statuses.append(TunerLayerStatus(
            name=name,
            module_type=type(module).__name__,
            enabled=not module.disabled,
            active_adapters=list(getattr(module, "active_adapters", [module.active_adapter])),
            merged_adapters=merged,
            requires_grad={k: _agreed([p.requires_grad for p in ps]) for k, ps in params.items()},
            available_adapters=sorted(params),
            devices={k: sorted({p.device.type for p in ps}) for k, ps in params.items()},
            quantization_backend=_quantization(module),
        ))
    if not statuses:
        raise ValueError("no adapter layers found in the model: it needs adapters grafted by get_peft_model, "
                         "PeftModel.from_pretrained or inject_adapter_in_model (prompt-learning methods have none)")
    return statuses


def _merged_adapters(layers: list[TunerLayerStatus]) -> Union[list[str], Irregular]:
    """The adapters merged in every layer that carries them; ``"irregular"`` when one is merged in
    some of its layers and not in others (adapters on different modules are not irregular)."""
    merged_where: dict[str, set[bool]] = {}
    for status in layers:
        for adapter in status.available_adapters:
            merged_where.setdefault(adapter, set()).add(adapter in status.merged_adapters)
    if any(len(flags) > 1 for flags in merged_where.values()):
        return "irregular"
    in_order = dict.fromkeys(a for status in layers for a in status.merged_adapters)  # the order they merged in
    return [a for a in in_order if merged_where.get(a) == {True}]


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The whole model's :class:`TunerModelStatus`, from :func:`get_layer_status` and its parameters."""
    from .model import PeftModel

    layers = get_layer_status(model)
    tuner = _tuner(model)
    if isinstance(model, PeftModel):
        base_type, trainable, total = type(model.get_base_model()).__name__, *model.get_nb_trainable_parameters()
    else:
        base_type = type(model).__name__
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    configs = getattr(tuner, "peft_config", {}) if isinstance(tuner, BaseTuner) else {}

    def agreed(field: str):
        values = [getattr(status, field) for status in layers]
        return values[0] if all(v == values[0] for v in values) else "irregular"

    grads: dict[str, list] = {}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for adapter, flag in status.requires_grad.items():
            grads.setdefault(adapter, []).append(flag)
        for adapter, kinds in status.devices.items():
            devices.setdefault(adapter, set()).update(kinds)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=type(tuner).__name__ if isinstance(tuner, BaseTuner) else "None",
        peft_types={name: str(config.peft_type) for name, config in configs.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=agreed("enabled"),
        active_adapters=agreed("active_adapters"),
        merged_adapters=_merged_adapters(layers),
        requires_grad={k: v[0] if all(f == v[0] for f in v) and v[0] != "irregular" else "irregular"
                       for k, v in grads.items()},
        available_adapters=sorted({a for status in layers for a in status.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=agreed("quantization_backend"),
    )
