"""What every graft method shares: adapter bookkeeping on layers and on the model.

* :class:`AdapterLayer` is mixed into each layer that wraps a base module
  (``base_layer``). It knows the active adapter, a ``disabled`` switch, which
  adapters are merged, and which adapter each row of a mixed batch uses.
* :class:`ModulesToSaveWrapper` keeps a trainable copy of a whole module
  (a classifier head, an embedding) per adapter beside the frozen original.
* :class:`BaseTuner` is ``PeftModel.base_model``: it holds the user's model
  under ``.model`` (so parameter names match HF PEFT's
  ``base_model.model.<name>``) and grafts, switches, merges and removes adapters.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .config import PeftConfig
from .inject import name_matches, replace_module, tied_weights

BASE_ADAPTER_NAME = "__base__"

# Per-row adapter names of the batch being run (mixed-adapter batches), or None.
_batch_adapter_names: contextvars.ContextVar[Optional[list[str]]] = contextvars.ContextVar(
    "tsugiki_batch_adapter_names", default=None
)


@contextlib.contextmanager
def batch_adapter_names(names: Optional[Sequence[str]]) -> Iterator[None]:
    """Run the enclosed forward passes with one adapter per batch row."""
    token = _batch_adapter_names.set(list(names) if names is not None else None)
    try:
        yield
    finally:
        _batch_adapter_names.reset(token)


def current_batch_adapters() -> Optional[list[str]]:
    """The per-row adapter names set by :func:`batch_adapter_names`, or None outside a mixed batch."""
    return _batch_adapter_names.get()


def rows_per_adapter(names: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Group row indices by adapter name; expands names when generate repeats rows (beams)."""
    names = list(names)
    if batch_size != len(names):
        if len(names) == 0 or batch_size % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows")
        repeat = batch_size // len(names)
        names = [n for n in names for _ in range(repeat)]
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    return {n: torch.tensor(rows, dtype=torch.long) for n, rows in groups.items()}


class AdapterLayer:
    """State shared by all adapter-carrying layers (mixed into an nn.Module)."""

    adapter_param_names: tuple[str, ...] = ()

    def _init_adapter_state(self) -> None:
        self.active_adapter: str = "default"
        self.extra_active: tuple[str, ...] = ()  # further active adapters (LoRA): their updates add up
        self.disabled: bool = False
        self.merged_adapters: list[str] = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (HF PEFT's name): ``active_adapter`` first, then ``extra_active``."""
        return [self.active_adapter, *self.extra_active] if self.active_adapter else []

    @property
    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_param_names[0])
        return list(first.keys())

    # Models read their layers' weights directly (T5's ``self.wo.weight.dtype``, a tied
    # or resized embedding's ``.weight``): an adapter layer answers with its base's.
    @property
    def weight(self) -> torch.Tensor:
        """The wrapped base layer's weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The wrapped base layer's bias."""
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Module:
        """The original layer under every adapter wrapper (HF PEFT's name)."""
        base = self.base_layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def disable_adapters(self) -> bool:
        """Whether this layer runs its base alone (HF PEFT's name for ``disabled``)."""
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the layer's adapters on (the active one trainable again) or off (all frozen), as HF PEFT's."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for attr in self.adapter_param_names:
                for holder in getattr(self, attr).values():
                    for p in [holder] if isinstance(holder, nn.Parameter) else holder.parameters():
                        p.requires_grad_(False)
        self.disabled = not enabled

    def set_adapter(self, name: Union[str, Sequence[str]], trainable: bool = True) -> None:
        """Activate adapter ``name``, or several (a list: their updates are summed); only they may train."""
        names = [name] if isinstance(name, str) else list(name)
        self.active_adapter = names[0] if names else ""
        self.extra_active = tuple(names[1:])
        for attr in self.adapter_param_names:
            for key, holder in getattr(self, attr).items():
                params = [holder] if isinstance(holder, nn.Parameter) else holder.parameters()
                for p in params:
                    p.requires_grad_(trainable and key in names)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        for attr in ("r", "lora_alpha", "scaling", "use_rslora"):
            table = vars(self).get(attr)  # not getattr: a wrapped module may have a plain ``scaling``
            if isinstance(table, dict):
                table.pop(name, None)
        dropout = getattr(self, "lora_dropout", None)
        if dropout is not None and name in dropout:
            del dropout[name]

    def merge_problem(self, name: str, merged: Sequence[str]) -> Optional[str]:
        """Why ``name`` cannot be merged on top of the ``merged`` adapters, or None (it can)."""
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Add adapters' updates into the base layer's weight (HF PEFT's signature and defaults).

        Args:
            safe_merge: check that the update is finite before writing it; a NaN/Inf raises
                ``ValueError`` and leaves the weight as it was (default False).
            adapter_names: the adapters to merge, in order; ``None`` (default) merges the active
                adapter. Names this layer does not carry are skipped, as in HF PEFT, so that one
                loop can go over every layer; adapters already merged are skipped too.

        All of them merge or none does. ``merge("name")`` (a name where ``safe_merge`` goes)
        merges that adapter, as tsugiki's earlier ``merge(name)`` did.
        """
        if isinstance(safe_merge, str):
            if adapter_names is not None:
                raise TypeError(f"merge({safe_merge!r}, adapter_names={adapter_names!r}): give the adapters "
                                "once, as adapter_names=[...]")
            safe_merge, adapter_names = False, [safe_merge]
        names = self._names_to_merge(adapter_names)
        merged = list(self.merged_adapters)
        for name in names:  # refuse before any weight changes
            problem = self.merge_problem(name, merged)
            if problem:
                raise ValueError(problem)
            merged.append(name)
        done: list[str] = []
        try:
            for name in names:
                self._merge_adapter(name, safe_merge)
                done.append(name)
        except Exception:
            for name in reversed(done):
                self.unmerge(name)
            raise

    def _names_to_merge(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        """The adapters ``merge`` takes: given (a str as one name) or the active ones, carried here, not merged."""
        if adapter_names is None:
            adapter_names = self.active_adapters
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        carried = self.adapter_names
        return [n for n in dict.fromkeys(adapter_names) if n in carried and n not in self.merged_adapters]

    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        """Merge one adapter this layer carries (each method's own arithmetic)."""
        raise NotImplementedError

    def unmerge(self, name: Optional[str] = None) -> None:
        """Take merged adapters out of the base weight again: ``name``, or all of them (default), last first."""
        raise NotImplementedError

    def unmerge_all(self) -> None:
        while self.merged_adapters:
            self.unmerge(self.merged_adapters[-1])

    def additive_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x)`` plus the active adapter's ``_adapter_out(x, name, base_out)``.

        In a mixed-adapter batch each row gets its own adapter's term; an adapter
        whose ``_adapter_out`` returns None adds nothing (e.g. a dropped module).
        """
        if self.disabled:
            self.unmerge_all()
            return self.base_layer(x, *args, **kwargs)
        mixed = self._check_mixed_batch()
        result = self.base_layer(x, *args, **kwargs)
        if mixed is not None:
            out = result.clone()
            for name, rows in rows_per_adapter(mixed, x.shape[0]).items():
                if name in self.adapter_names:
                    extra = self._adapter_out(x[rows], name, result[rows])
                    if extra is not None:
                        out[rows] = out[rows] + extra.to(result.dtype)
            return out
        if self.merged:
            return result
        out, carried = result, self.adapter_names
        for name in self.active_adapters:
            if name in carried:
                extra = self._adapter_out(x, name, result)
                if extra is not None:
                    out = out + extra.to(result.dtype)
        return out

    def _check_mixed_batch(self) -> Optional[list[str]]:
        names = _batch_adapter_names.get()
        if names is not None and self.merged:
            raise ValueError("a mixed-adapter batch needs unmerged adapters; call unmerge_adapter() first")
        return names


class ModulesToSaveWrapper(nn.Module):
    """A frozen original module plus one trainable full copy per adapter.

    Used for ``modules_to_save`` (e.g. a classification head trained from
    scratch). Saved under the module's own key, like HF PEFT.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        for p in self.original_module.parameters():
            p.requires_grad_(False)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def set_adapter(self, name: Union[str, Sequence[str]], trainable: bool = True) -> None:
        """Use adapter ``name``'s copy; of several active adapters, the one that has a copy here
        (at most one may: ``BaseTuner.set_adapter`` checks), else the original module."""
        names = [name] if isinstance(name, str) else list(name)
        copies = [n for n in names if n in self.modules_to_save]
        self.active_adapter = copies[0] if copies else (names[0] if names else "")
        for key, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(trainable and key in names)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = _batch_adapter_names.get()
        if names is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs).clone()
        for name, rows in rows_per_adapter(names, x.shape[0]).items():
            if name in self.modules_to_save:
                out[rows] = self.modules_to_save[name](x[rows], *args, **kwargs)
        return out

    def __getattr__(self, name: str) -> Any:
        # Reading attributes such as .weight or .out_features goes to the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)


# peft_type -> tuner class; each method module registers its own (see tsugiki.methods).
TUNER_REGISTRY: dict[str, type["BaseTuner"]] = {}


def register_tuner(peft_type: str):
    """Class decorator: ``@register_tuner("LORA")`` makes ``get_peft_model`` use the class for that method."""
    def wrap(cls: type["BaseTuner"]) -> type["BaseTuner"]:
        TUNER_REGISTRY[peft_type] = cls
        return cls
    return wrap


class BaseTuner(nn.Module):
    """Holds the user's model and grafts one method's adapters onto it.

    Subclasses set ``layer_class`` (a tuple of their layer types) and implement
    ``_create_layer(config, adapter_name, target_name, target)`` returning the new
    module (or updating ``target`` in place when it already carries adapters) and
    ``_mark_trainable(config, adapter_name)``.
    """

    layer_classes: tuple[type, ...] = ()
    several_active = False  # whether set_adapter takes a list (the method's layers sum their updates)
    extra_active: tuple[str, ...] = ()  # active adapters after active_adapter
    _disabled = False  # set_disabled's switch

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default", init_weights: bool = True):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.inject_adapter(config, adapter_name, init_weights=init_weights)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (HF PEFT's name), ``active_adapter`` first; not the wrapped model's attribute."""
        return [self.active_adapter, *self.extra_active] if self.active_adapter else []

    # -- attribute passthrough ------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generation through the wrapped model (prompt-based methods override this)."""
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"{type(self.model).__name__} has no generate(); it is not a generative model")
        return self.model.generate(*args, **kwargs)

    # -- grafting -------------------------------------------------------------
    def inject_adapter(self, config: PeftConfig, adapter_name: str, init_weights: bool = True) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for the bare base in mixed batches")
        # Adapters already here keep their trainable flags (one loaded with is_trainable=True stays so).
        flags = {p: p.requires_grad for n, p in self.model.named_parameters() if self._is_adapter_param(n)}
        self.peft_config[adapter_name] = config
        try:
            self._inject(config, adapter_name, init_weights)
            self._wrap_modules_to_save(config, adapter_name)
        except BaseException:
            self._remove_adapter_modules(adapter_name)
            del self.peft_config[adapter_name]
            raise
        active = [n for n in self.active_adapters if n in self.peft_config]
        self.set_adapter((active if len(active) > 1 else active[0]) if active else adapter_name)
        for param, trainable in flags.items():
            param.requires_grad_(trainable)

    def _inject(self, config: PeftConfig, adapter_name: str, init_weights: bool) -> None:
        raise NotImplementedError

    def _wrap_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        wanted = getattr(config, "modules_to_save", None)
        if not wanted:
            return
        found, wrapped = False, []
        for name, module in list(self.model.named_modules()):
            if not name or not name_matches(name, wanted):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name) if adapter_name not in module.modules_to_save else None
                found = True
                continue
            if any(isinstance(m, ModulesToSaveWrapper) for m in self._ancestors(name)):
                continue
            if isinstance(module, AdapterLayer):  # a copy of it would carry the other adapters' layers
                raise ValueError(
                    f"modules_to_save={list(wanted)!r}: {name} carries the adapter layers of "
                    f"{', '.join(map(repr, module.adapter_names)) or 'another adapter'} ({type(module).__name__}), "
                    f"and a trained copy of a module cannot hold another adapter's layers (HF PEFT refuses this "
                    f"too). Load adapter {adapter_name!r} on a base of its own, or train the other adapter "
                    f"without {name.rsplit('.', 1)[-1]} in its target_modules")
            wrapped.append(name)
            found = True
        self._warn_about_tied_copies(wanted, wrapped)
        for name in wrapped:
            replace_module(self.model, name, ModulesToSaveWrapper(self.model.get_submodule(name), adapter_name))
        if not found and getattr(config, "_user_modules_to_save", True):
            raise ValueError(
                f"modules_to_save={list(wanted)!r} matched no module of {type(self.model).__name__}; "
                "list module names that exist (e.g. 'classifier', 'score', 'embed_tokens')"
            )

    def _warn_about_tied_copies(self, wanted: Sequence[str], names: Sequence[str]) -> None:
        """A module trained whole whose weight another module shares (SmolLM2's embedding and output
        layer): the trained copy serves the listed module only, the other keeps the original."""
        for name, others in tied_weights(self.model, names).items():
            others = [o for o in others if o not in names]
            if others:
                warnings.warn(f"modules_to_save={list(wanted)!r}: {name} shares its weight with {', '.join(others)} "
                              f"(tied embeddings); the trained copy replaces it for {name} only, {others[0]} keeps "
                              "the original weight (as in HF PEFT). Add it to modules_to_save to train a copy "
                              "of its own too", stacklevel=7)

    def _ancestors(self, name: str) -> Iterator[nn.Module]:
        parts = name.split(".")
        for i in range(1, len(parts)):
            yield self.model.get_submodule(".".join(parts[:i]))

    # -- switching ------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield name, module

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: Optional[bool] = None) -> None:
        """Make ``adapter_name`` the active adapter, or, for LoRA, a list of adapters active together
        (HF PEFT's ``base_model.set_adapter(["a", "b"])``: each layer adds every listed adapter's update,
        ``W0 x + sum_i s_i B_i A_i x``; ``active_adapter`` is then the first).

        Their parameters are trainable unless ``inference_mode`` is True; ``None`` (what
        tsugiki itself passes when it re-activates an adapter) follows each adapter's
        config, so one loaded for inference stays frozen. ``PeftModel.set_adapter``
        passes False by default, as HF PEFT does. Adapters merged into the base are
        unmerged first (with a warning) when another adapter is activated: the
        forward could not take the merged one out again.
        """
        names = self._adapters_to_activate(adapter_name)
        merged = {n for _, m in self.adapter_layers() if isinstance(m, AdapterLayer) for n in m.merged_adapters}
        if merged - set(names):
            warnings.warn(f"adapter(s) {sorted(merged)} are merged into the base; unmerging them before "
                          f"activating {', '.join(map(repr, names))}", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapter, self.extra_active = names[0], tuple(names[1:])
        for _, module in self.adapter_layers():
            module.set_adapter(names if len(names) > 1 else names[0], trainable=False)
        for name in names:
            config = self.peft_config[name]
            trainable = not (config.inference_mode if inference_mode is None else inference_mode)
            self._mark_trainable(config, name, trainable)
            if trainable:
                self.set_requires_grad([name])

    def _adapters_to_activate(self, adapter_name: Union[str, Sequence[str]]) -> list[str]:
        """``set_adapter``'s argument as a list of known names, or the reason it cannot be."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1 and not self.several_active:
            raise TypeError(f"set_adapter takes one adapter name, got {adapter_name!r}: {type(self).__name__} runs "
                            "one adapter at a time. To apply several together, fold them into the base with "
                            "merge_adapter(names)")
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) < len(names):
            raise TypeError(f"set_adapter takes an adapter name or a list of distinct names, got {adapter_name!r}")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; have: {', '.join(self.peft_config)}")
        for name, module in self.adapter_layers():
            owners = [n for n in names if isinstance(module, ModulesToSaveWrapper) and n in module.modules_to_save]
            if len(owners) > 1:
                raise ValueError(f"adapters {owners} each have their own copy of {name!r} (modules_to_save), and "
                                 "one module can use only one copy; activate at most one of them")
        return names

    def train_inactive_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name``'s parameters trainable without activating it (HF PEFT's
        ``load_adapter(..., is_trainable=True)`` of a second adapter); the active one stays as it is."""
        self.set_requires_grad([adapter_name])

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Set ``requires_grad`` (default True) on the named adapters' parameters in every layer,
        ``modules_to_save`` copies included (HF PEFT's ``set_requires_grad``). Other adapters, the
        active one and the base weights are left as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; have: {', '.join(self.peft_config)}")
        for param in self._adapter_parameters(names):
            param.requires_grad_(requires_grad)

    def _adapter_parameters(self, names: Sequence[str]) -> Iterator[nn.Parameter]:
        """The parameters the adapters ``names`` own in the model's layers."""
        for _, module in self.adapter_layers():
            holders = ([module.modules_to_save] if isinstance(module, ModulesToSaveWrapper)
                       else [getattr(module, attr) for attr in module.adapter_param_names])
            for holder in holders:
                for name in names:
                    if name in holder:
                        found = holder[name]
                        yield from [found] if isinstance(found, nn.Parameter) else found.parameters()

    def _mark_trainable(self, config: PeftConfig, adapter_name: str, trainable: bool = True) -> None:
        """Freeze everything that is not the active adapter (subclasses add bias rules)."""
        for name, p in self.model.named_parameters():
            if not self._is_adapter_param(name):
                p.requires_grad_(False)

    def _is_adapter_param(self, param_name: str) -> bool:
        parts = param_name.split(".")
        return any(p in self.adapter_attr_names() or p == "modules_to_save" for p in parts)

    def adapter_state_to_save(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for ``adapter_name`` (file keys); a method whose file form
        differs from its in-memory one overrides this (AdaLoRA drops its pruned ranks)."""
        return state

    @classmethod
    def adapter_attr_names(cls) -> tuple[str, ...]:
        """The attribute names under which this method's layers keep adapter tensors (``lora_A``, ...)."""
        names: list[str] = []
        for layer_cls in cls.layer_classes:
            names.extend(layer_cls.adapter_param_names)
        return tuple(names)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names of the modules that carry adapters (HF PEFT's attribute)."""
        return [name for name, module in self.adapter_layers() if isinstance(module, AdapterLayer)]

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`."""
        self.set_disabled(False)

    def disable_adapter_layers(self) -> None:
        """Make every adapter layer compute what its base layer does (merged adapters are unmerged)."""
        self.set_disabled(True)

    @property
    def adapters_disabled(self) -> bool:
        """Whether every adapter is switched off (``disable_adapter_layers``, ``PeftModel.disable_adapter``)."""
        return self._disabled

    def set_disabled(self, disabled: bool) -> None:
        self._disabled = disabled
        for _, module in self.adapter_layers():
            if disabled and isinstance(module, AdapterLayer):
                module.unmerge_all()
            module.disabled = disabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have: {', '.join(self.peft_config)}")
        self._remove_adapter_modules(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self.active_adapters:
            # The other active adapters stay; with none left the first by name becomes active, as in HF PEFT.
            remaining = [n for n in self.active_adapters if n != adapter_name] or sorted(self.peft_config)[:1]
            self.active_adapter, self.extra_active = "", ()
            if remaining:
                self.set_adapter(remaining if len(remaining) > 1 else remaining[0])

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        for name, module in list(self.adapter_layers()):
            if adapter_name in module.adapter_names:
                if isinstance(module, AdapterLayer) and adapter_name in module.merged_adapters:
                    module.unmerge(adapter_name)
                module.delete_adapter(adapter_name)
            if not module.adapter_names:  # nothing left: restore the plain module
                original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.base_layer
                replace_module(self.model, name, original)

    # -- merging --------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Add ``adapter_names`` (default: the active adapters) into the base weights, all or none:
        a merge refused in one layer (or a non-finite update under ``safe_merge``) leaves no layer merged."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; have: {', '.join(self.peft_config)}")
        layers = [m for _, m in self.adapter_layers() if isinstance(m, AdapterLayer)]
        for module in layers:  # refuse before any weight changes
            merged = list(module.merged_adapters)
            for n in (n for n in names if n in module.adapter_names):
                problem = module.merge_problem(n, merged)
                if problem:
                    raise ValueError(problem)
                merged.append(n)
        done: list[tuple[AdapterLayer, str]] = []
        try:
            for module in layers:
                for n in names:
                    if n in module.adapter_names and n not in module.merged_adapters:
                        module.merge(safe_merge=safe_merge, adapter_names=[n])
                        done.append((module, n))
        except Exception:
            for module, n in reversed(done):
                module.unmerge(n)
            raise

    def unmerge_adapter(self) -> None:
        for _, module in self.adapter_layers():
            if isinstance(module, AdapterLayer):
                module.unmerge_all()

    def _unload(self, merge: bool, safe_merge: bool = False,
                adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for name, module in list(self.adapter_layers()):
            if isinstance(module, ModulesToSaveWrapper):
                # The active adapter's trained copy stays, merged or not (a classifier head trained from
                # scratch is the adapter's, not the base's), as in HF PEFT.
                keep = module.modules_to_save[module.active_adapter] \
                    if module.active_adapter in module.modules_to_save else module.original_module
                replace_module(self.model, name, keep)
            else:
                replace_module(self.model, name, module.base_layer)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None, dequantize: bool = False,
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
        """Merge the adapter(s) into the base weights and return the plain base model.

        On a 4-bit/8-bit base the merge is computed in fp32; ``dequantize=False`` (default)
        quantizes the merged weight again, which rounds it (a warning says so);
        ``dequantize=True`` returns an unquantized model that plain transformers loads:
        with ``dtype``, the whole model in it (fp32 keeps the merge unrounded); by default
        its merged layers in the dtype of the model's other weights (its input embedding's).
        """
        from .inject import bnb_linear_types

        kbit = bnb_linear_types()
        if kbit and any(isinstance(m, kbit) for m in self.model.modules()):
            if dequantize:
                from .quant import dequantize_layers, unquantized_dtype

                # Merged in fp32 (unrounded), then stored in ``dtype``: by default that of the weights
                # around them, without which the model cannot run.
                final = dtype or unquantized_dtype(self.model) or torch.float32
                layers = dequantize_layers(self.model, torch.float32)
                merged = self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)
                for layer in layers:
                    layer.to(final)
                return merged.to(dtype) if dtype is not None else merged  # one dtype: a model that runs
            else:
                warnings.warn("merging into a quantized base: the merged weights are quantized again, which "
                              "rounds them; pass dequantize=True for an exact, unquantized merged model",
                              stacklevel=2)
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model. Modules trained whole
        (``modules_to_save``) keep the active adapter's copy, as HF PEFT's ``unload`` does."""
        return self._unload(merge=False)
