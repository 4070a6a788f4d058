"""The method registry. A method is a module in this package with a `Method` subclass decorated with
`@register_method("name")`; every module here is imported below, so adding one needs no edit elsewhere (a
method defined anywhere else registers the same way once its module is imported)."""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.config import DEFAULT_METHOD, REGISTRY, Config, MethodConfig
from pipeline.methods.base import Method


def register_method(name: str, default: bool = False):
    """Class decorator: `cls.Config` (a MethodConfig subclass) validates `method:` when method.name == name."""

    def register(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) decorates a Method subclass, got {cls!r}")
        if name in REGISTRY and REGISTRY[name].method_class is not cls:
            raise ValueError(f"method {name!r} is already registered by {REGISTRY[name].method_class.__qualname__}")
        # A class of its own per method, so that two methods sharing a settings class stay apart.
        config = type(f"{cls.__name__}Config", (cls.Config,), {"__module__": cls.__module__, "method_class": cls})
        REGISTRY[name] = config
        if default:
            DEFAULT_METHOD[:] = [name]
        return cls

    return register


def build_method(cfg: Config) -> Method:
    return type(cfg.method).method_class(cfg)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "MethodConfig", "REGISTRY", "build_method", "register_method"]
