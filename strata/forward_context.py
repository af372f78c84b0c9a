"""The one global: attention metadata for the step being computed.

Layers deep inside the model read it instead of threading it through every forward signature;
the runner sets it around each forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

_current: Any = None


@contextlib.contextmanager
def set_forward_context(attn_metadata):
    global _current
    previous, _current = _current, attn_metadata
    try:
        yield
    finally:
        _current = previous


def get_attn_metadata():
    if _current is None:
        raise RuntimeError("attention was called outside a forward context (set_forward_context)")
    return _current
