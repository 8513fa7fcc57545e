"""Reads of the LOLA_* environment variables on the per-call path.

Every layer of a model asks which backend and which CPU instruction set to use, and the answer
must follow the variables as they are set between calls (tests and users flip LOLA_BACKEND at run
time). ``os.environ.get`` on an unset variable raises and catches two KeyErrors inside the
Mapping machinery: right after a cache-evicting GEMM that costs 15-30 µs, more than a decode-size
kernel. On POSIX ``os.environ`` keeps its values in a plain bytes-keyed dict (``_data``) that its
``__setitem__``/``__delitem__`` update with ``putenv``/``unsetenv``, so a lookup there sees
exactly what ``os.environ`` sees, at the cost of one dict probe.
"""
from __future__ import annotations

import os

# The dict behind os.environ, where this interpreter has one keyed as on POSIX; else None and
# every read goes through os.environ.
_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_DATA, dict):
    _DATA = None


_ENCODED: dict[str, bytes] = {}


def read(name: str) -> str:
    """The variable's value, or "" when it is unset."""
    if _DATA is None:
        return os.environ.get(name, "")
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.fsencode(name)
    value = _DATA.get(key)
    return "" if value is None else os.fsdecode(value)
