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

from fxdp.core.errors import PrivacyError, UncoveredParameterError

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


def untraced_recurrent(names) -> UncoveredParameterError:
    """Refusal of trainable ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` layers (``names``) while
    ``torch._dynamo.config.allow_rnn`` is off: dynamo breaks the graph at them and runs them untraced. The
    flag is read whenever dynamo compiles: a graph compiled while it was on (the layer inside, replayed as
    its tapped recurrence) is reused after it is turned off, exactly; a new compile with it off is refused,
    from :func:`fxdp.compile.region.find_parameters` (any region of the model with parameters) or, when the
    layer runs before such a region is compiled, from :func:`fxdp.compile.islands.enter_island`."""
    return UncoveredParameterError(
        f"fxdp backend: recurrent layer(s) {', '.join(list(names)[:3])} would run outside the compiled graph: dynamo "
        "does not trace nn.LSTM / nn.GRU / nn.RNN while torch._dynamo.config.allow_rnn is False (the default) and "
        "runs the layer untraced, where fxdp does not tap it, so its weights' gradients would not be clipped. Set "
        "torch._dynamo.config.allow_rnn = True before the first compiled forward (fxdp then taps every time step "
        "inside the graph, exactly), or use eager fxdp.privatize for this model.")
