"""torch as an optional test dependency: the parity oracle on stack A, absent on stack B.

``from optional_torch import torch, F`` gives the real modules when torch is installed. Without it
they are stand-ins that skip the running test ("needs torch") when used, so a test that touches
the oracle is reported as skipped and every other test in the same file still runs.
"""

from __future__ import annotations

import importlib

import pytest

SKIP_REASON = "needs torch (the parity oracle): not installed on this stack"

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.modules.utils import _pair

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

    def _skip_missing(name: str):
        pytest.skip(f"{SKIP_REASON} ({name})", allow_module_level=True)

    class _MissingBase:
        """What ``class Ref(torch.nn.Module)`` derives from without torch: making one skips."""

        def __init__(self, *args, **kwargs):
            _skip_missing(type(self).__name__)

    class _Missing:
        """A stand-in for a torch name: attribute chains give more stand-ins (so module-level
        ``class Ref(torch.nn.Module)`` or ``dtype=torch.float32`` still import), and using one
        (calling, iterating, indexing, isinstance, instantiating a subclass) skips the running test."""

        def __init__(self, name: str):
            self._name = name

        def __getattr__(self, attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Missing(f"{self._name}.{attr}")

        def __mro_entries__(self, bases):
            return (_MissingBase,)

        def _skip(self, *args, **kwargs):
            _skip_missing(self._name)

        __call__ = __iter__ = __getitem__ = __instancecheck__ = _skip

        def __repr__(self):
            return f"<missing {self._name}>"

    torch = _Missing("torch")
    F = _Missing("torch.nn.functional")
    _pair = _Missing("torch.nn.modules.utils._pair")


def import_oracle(name: str):
    """A torch-based oracle package (e.g. ``sync_batchnorm``): skips without torch; with torch
    installed a missing oracle is a broken set-up and raises ImportError."""
    if not HAVE_TORCH:
        pytest.skip(SKIP_REASON, allow_module_level=True)
    return importlib.import_module(name)
