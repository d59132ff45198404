"""Attention methods: one module per method, one registry.

A method is one :class:`AttentionMethod` subclass in a file of its own plus one
:func:`register_method` line. Registration stores an import path, so listing and
validating method names imports neither torch nor the methods' modules::

    from drrl_env.methods import make_method, method_names

    method_names()  # ('full', 'gram', 'svd', 'calibrated', 'calibrated-kv', 'topk', ...)
    method = make_method("gram", head_dim=64, n_layers=30)

Adding a method: write ``my_method.py`` with ``class MyMethod(AttentionMethod)`` (a ``name``,
``observe``, ``reference``, ``feature_flops``, ``setting_flops``), then register it here
(``register_method("mine", "drrl_env.methods.my_method:MyMethod")``) or from your own code
(``register_method("mine", MyMethod)``); ``gym.make(..., method="mine")`` then works.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drrl_env.methods.base import AttentionMethod

_REGISTRY: dict[str, Any] = {}


def register_method(name: str, target: type | str, *, replace: bool = False) -> None:
    """Register a method class (or its ``"module:Class"`` import path) under ``name``.

    Raises:
        ValueError: ``name`` is taken (unless ``replace``) or not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = target


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (tests registering toy methods clean up with it)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def check_method_name(name: str) -> str:
    """``name`` if registered, else ValueError listing the registered methods."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method={name!r} is not registered; methods: {', '.join(_REGISTRY)}")
    return name


def method_class(name: str) -> type[AttentionMethod]:
    """The class registered under ``name`` (imported on first use)."""
    target = _REGISTRY[check_method_name(name)]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _REGISTRY[name] = target
    return target


def make_method(name: str, head_dim: int, n_layers: int, **kwargs: Any) -> AttentionMethod:
    """An instance of the method ``name`` for a model of ``n_layers`` and head dim ``head_dim``.

    ``kwargs`` go to the method (``basis=`` for the calibrated methods, options such as
    ``min_keys=`` for ``topk``).
    """
    return method_class(name)(head_dim, n_layers, **kwargs)


register_method("full", "drrl_env.methods.full:FullMethod")
register_method("gram", "drrl_env.methods.gram:GramMethod")
register_method("svd", "drrl_env.methods.svd:SVDMethod")
register_method("calibrated", "drrl_env.methods.calibrated:CalibratedMethod")
register_method("calibrated-kv", "drrl_env.methods.calibrated:KVHeadCalibratedMethod")
register_method("topk", "drrl_env.methods.topk:TopKMethod")
register_method("topk-block", "drrl_env.methods.topk_block:TopKBlockMethod")
register_method("topp", "drrl_env.methods.topp:TopPMethod")
