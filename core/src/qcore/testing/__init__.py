"""qcore.testing: the conformance suite a backend author runs on their own backend.

Imported on demand (``import qcore`` does not import it, nor pytest)::

    # tests/test_conformance.py of the distribution qcore-foo
    from qcore.testing import BackendConformance
    from qcore_foo import FooConfig

    class TestFooConformance(BackendConformance):
        config_class = FooConfig
        config_kwargs = {"bits": 4}
        forward_tolerance = 0.1     # what this format can reach
        min_memory_ratio = 3.0

``pytest`` then runs every check of :class:`BackendConformance` against the installed backend.
:class:`HookRecorder` is the observer plugin the suite uses to see the lifecycle; it works for any
``qcore.from_pretrained(..., observers=[...])`` call.
"""

from __future__ import annotations

from ._capabilities import CAPABILITIES, BackendCapabilities, CapabilityResult, capability_matrix
from ._conformance import CORRUPTIONS, BackendConformance, first_tensor, relative_error, tensor_bytes
from ._models import ConformanceBlock, ConformanceModel
from ._observers import HOOK_NAMES, LOAD_ORDER, SAVE_ORDER, HookRecorder

__all__ = [
    "BackendConformance",
    "BackendCapabilities",
    "CAPABILITIES",
    "CapabilityResult",
    "capability_matrix",
    "ConformanceModel",
    "ConformanceBlock",
    "HookRecorder",
    "HOOK_NAMES",
    "LOAD_ORDER",
    "SAVE_ORDER",
    "CORRUPTIONS",
    "first_tensor",
    "relative_error",
    "tensor_bytes",
]
