"""autotinybert: find, build and ship the best tiny BERT for a latency budget (AutoTinyBERT, ACL 2021).

`Arch` and `SearchSpace` import without torch; the model classes load on first use so that
pure stages (search, report) stay light.
"""

from __future__ import annotations

from .errors import UserError
from .space import Arch, Dim, SearchSpace

__version__ = "0.1.0"

_LAZY = {
    "SuperBertConfig": "modeling",
    "SuperBertModel": "modeling",
    "SuperBertForPreTraining": "modeling",
    "extract": "export",
    "verify_export": "export",
}

__all__ = ["Arch", "Dim", "SearchSpace", "UserError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'autotinybert' has no attribute {name!r}")
