"""One registry for every pluggable component.

``@register("quantizer", "uniform")`` on a dataclass gives it a short name, makes the dataclass its
config schema and stores that schema in Hydra's ConfigStore as ``schema/<group>/<name>``. The YAML
option ``conf/<group>/<name>.yaml`` extends the schema (``- /schema/<group>/<name>@_here_``), so a
wrong type or an unknown key fails when the config is composed, and ``OmegaConf.to_object`` on the
composed node returns the component itself. Adding a component is one module plus one YAML file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import is_dataclass
from typing import Any, Callable, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from ..kv.errors import ConfigError
from .schema import unknown_key, valid_keys

T = TypeVar("T")

GROUPS = ("model", "data", "task", "quantizer", "sink", "outlier", "attention", "logger")
_REGISTRY: dict[str, dict[str, type]] = {g: {} for g in GROUPS}


def register(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass component under ``group``/``name``."""
    if group not in _REGISTRY:
        raise ValueError(f"unknown component group {group!r}; groups: {list(_REGISTRY)}")

    def decorate(cls: type[T]) -> type[T]:
        if not is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
        _REGISTRY[group][name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        ConfigStore.instance().store(group=f"schema/{group}", name=name, node=cls, provider="streamkv")
        return cls

    return decorate


def name_of(component: Any) -> str:
    """The name ``component``'s class is registered under (its class name if it is not registered)."""
    cls = type(component)
    for group in _REGISTRY.values():
        for name, registered in group.items():
            if registered is cls:
                return name
    return cls.__name__


def names(group: str) -> list[str]:
    """Registered names of ``group``, sorted."""
    load_builtins()
    return sorted(_REGISTRY[group])


def get(group: str, name: str) -> type:
    """The class registered as ``group``/``name``; a one-line error lists the known names."""
    load_builtins()
    try:
        return _REGISTRY[group][name]
    except KeyError:
        raise ConfigError(f"{group}={name!r} is not a registered {group}; choose one of {names(group)}") from None


def create(group: str, spec: Any) -> Any:
    """Build a component from a composed config node, a plain dict with ``name``, or pass one through."""
    if isinstance(spec, DictConfig):
        try:
            obj = OmegaConf.to_object(spec)
        except MissingMandatoryValue as e:
            raise ConfigError(f"{group}.{e.key} must be set (e.g. {group}.{e.key}=...)") from None
        if not is_dataclass(obj):
            raise ConfigError(f"the '{group}' config has no registered schema; add '- /schema/{group}/<name>@_here_'")
        return obj
    if isinstance(spec, dict):
        spec = dict(spec)
        cls = get(group, spec.pop("name"))
        unknown = [k for k in spec if k not in valid_keys(cls)]
        if unknown:
            raise ConfigError(unknown_key(f"{group}.{unknown[0]}", cls))
        return cls(**spec)
    if isinstance(spec, str):
        return get(group, spec)()
    return spec


_loaded = False


def load_builtins() -> None:
    """Import every module of the built-in component packages, so each registers itself."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(f"{__package__}.components")  # the engine's built-in components
    for package in ("peers", "tasks", "loggers", "models", "data"):
        pkg = importlib.import_module(f"{__package__}.{package}")
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
