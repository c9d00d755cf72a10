"""The one registry of DFKD methods: name -> synthesizer class.

A method module decorates its class with `@register("name")`, where the name is also
the module name and the CLI name. Nothing else in the project dispatches on names.
Methods outside this package register the same way: name their modules in the
environment variable DFKD_METHOD_MODULES (comma-separated, importable), and every
process (CLIs and Ray workers alike) imports them on its first registry lookup.

    DFKD_METHOD_MODULES=mylab.fancy_inversion python -m orchestrator.bench --methods cmi,fancy
"""
from __future__ import annotations

import difflib
import importlib
import os


class UnknownMethodError(ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""


_METHODS: dict[str, type] = {}


_loaded_env: str | None = None


def register(name: str):
    def add(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        cls.display = cls.__dict__.get("display") or name
        _METHODS[name] = cls
        return cls
    return add


def _load_plugins() -> None:
    """Imports the modules named in DFKD_METHOD_MODULES (once per value of the variable)."""
    global _loaded_env
    value = os.environ.get("DFKD_METHOD_MODULES", "")
    if value == _loaded_env:
        return
    _loaded_env = value
    for module in filter(None, (m.strip() for m in value.split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UnknownMethodError(f"DFKD_METHOD_MODULES names {module!r}, which cannot be imported: {exc}") from None


def list_methods() -> list[str]:
    """Registered names, in registration order (the order of the reference table)."""
    _load_plugins()
    return list(_METHODS)


def is_registered(name: str) -> bool:
    _load_plugins()
    return name in _METHODS


def get_method(name: str) -> type:
    _load_plugins()
    if name in _METHODS:
        return _METHODS[name]
    hint = difflib.get_close_matches(str(name), list(_METHODS), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise UnknownMethodError(f"unknown method {name!r}{suggestion}; known methods: {', '.join(_METHODS)}")
