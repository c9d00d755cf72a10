"""The one registry of DFKD methods: name -> synthesizer class.

A method module decorates its class with `@register("name")`, where the name is also
the module name and the CLI name. Nothing else in the project dispatches on names.
"""
from __future__ import annotations

import difflib


class UnknownMethodError(ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""


_METHODS: dict[str, type] = {}


def register(name: str):
    def add(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def list_methods() -> list[str]:
    """Registered names, in registration order (the order of the reference table)."""
    return list(_METHODS)


def get_method(name: str) -> type:
    if name in _METHODS:
        return _METHODS[name]
    hint = difflib.get_close_matches(str(name), list(_METHODS), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise UnknownMethodError(f"unknown method {name!r}{suggestion}; known methods: {', '.join(_METHODS)}")
