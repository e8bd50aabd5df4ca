"""The data plane: the steady state of an association, compiled, with a pure twin.

Two modules implement the same functions with identical behaviour: ``_core`` (Cython,
built by ``pip install`` when a C compiler is there) and ``_pure`` (Python). The
compiled one is used unless the environment variable ``PACSRX_PURE_PYTHON=1`` is set
or it was not built; :data:`CORE` says which one runs (``"compiled"`` or ``"pure"``).
The state table, negotiation and the handler contract stay in readable Python; see
``workers.engine.connection`` for where the engine hands its steady state over.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from . import _pure
from ._pure import StoreRQ

__all__ = [
    "CORE",
    "IMPORT_ERROR",
    "MESSAGE_END",
    "NEED_DATA",
    "SLOW",
    "Framing",
    "StoreRQ",
    "compiled",
    "core",
    "decode_store_rq",
    "encode_store_rsp",
    "file_meta",
    "uid_valid",
    "walk_pdata",
]


def compiled() -> ModuleType | None:
    """The compiled module, or None when it was not built (or does not import)."""
    try:
        return importlib.import_module(__name__ + "._core")
    except ImportError:
        return None


#: Why the compiled module is not used, when it is not (None when it is, or when
#: the pure twin was asked for).
IMPORT_ERROR: str | None = None


def _choose() -> tuple[ModuleType, str]:
    global IMPORT_ERROR
    if os.environ.get("PACSRX_PURE_PYTHON", "") not in ("", "0"):
        return _pure, "pure"
    mod = compiled()
    if mod is None:
        IMPORT_ERROR = "the compiled data plane is not built"
        return _pure, "pure"
    return mod, "compiled"


core, CORE = _choose()

NEED_DATA: int = core.NEED_DATA
MESSAGE_END: int = core.MESSAGE_END
SLOW: int = core.SLOW
Framing = core.Framing
walk_pdata = core.walk_pdata
decode_store_rq = core.decode_store_rq
encode_store_rsp = core.encode_store_rsp
uid_valid = core.uid_valid
file_meta = core.file_meta
