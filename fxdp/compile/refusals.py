"""fxdp's refusals at compile time reach the user as fxdp errors, not as dynamo's ``BackendCompilerFailed``.

dynamo wraps any exception a backend raises in ``torch._dynamo.exc.BackendCompilerFailed`` (a raw torch
error: ``except fxdp.PrivacyError`` would not catch a refusal made while compiling), except exceptions
derived from its ``ShortenTraceback``, which it re-raises unchanged. :func:`surfaced` turns a
:class:`~fxdp.core.errors.PrivacyError` raised by the region passes into an instance of a class derived
from both the error's own class and ``ShortenTraceback``: the same name, message and attributes, caught by
``except SampleMixingError`` / ``except PrivacyError`` as in eager mode.
"""
from __future__ import annotations

from typing import Dict

from fxdp.core.errors import PrivacyError

_CLASSES: Dict[type, type] = {}


def _passthrough_class(cls: type) -> type:
    from torch._dynamo.exc import ShortenTraceback
    if issubclass(cls, ShortenTraceback):
        return cls
    if cls not in _CLASSES:
        def __init__(self, *args):
            cls.__init__(self, *args)
            # what dynamo reads of its own exceptions (torch._dynamo.exc.TorchDynamoException, ShortenTraceback)
            self.first_useful_frame = None
            self._torch_dynamo_tracer_output = None
            self.frame_exec_strategy = None

        def __reduce__(self):  # pickles as the plain fxdp error
            return cls, self.args

        _CLASSES[cls] = type(cls.__name__, (cls, ShortenTraceback),
                             {"__init__": __init__, "__reduce__": __reduce__, "__module__": cls.__module__,
                              "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def surfaced(exc: PrivacyError, example_inputs=()) -> PrivacyError:
    """``exc`` as an error dynamo hands to the user unchanged (module docstring); the open forward pass
    the graph belongs to is marked refused, in case dynamo runs it on regardless
    (:func:`fxdp.engine.compiled_checks.record_compile_refusal`)."""
    from fxdp.compile.graph_checks import open_context
    from fxdp.engine.compiled_checks import record_compile_refusal

    ctx, _ = open_context(example_inputs)
    if ctx is not None:
        record_compile_refusal(ctx, exc)
    new = _passthrough_class(type(exc))(*exc.args)
    new.__dict__.update({k: v for k, v in exc.__dict__.items() if k not in new.__dict__})
    return new
