"""The method table of the README, printed from the registry:  python -m methods

A new method appears here (and, once pasted, in the README) from its own class
attributes (`paper`, `kind`, `optimizes`); tests/test_registry.py keeps the README
in step with this output.
"""
from __future__ import annotations

from methods import get_method, list_methods


def method_table() -> str:
    rows = ["| name | paper | kind | what it optimises |", "|---|---|---|---|"]
    for name in list_methods():
        cls = get_method(name)
        rows.append(f"| `{name}` | {cls.paper} | {cls.kind} | {cls.optimizes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(method_table())
