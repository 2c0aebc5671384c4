"""Dataflow trace of one forward pass: which parameter use feeds which.

:func:`trace_model` runs the model once, with the same interception the
runtime uses (:class:`~fxdp.analysis.interceptor.ParameterInterceptor` and the
rule registry), and records for every parameter use

- the module whose ``forward`` was running (its path and type),
- the real shapes of the use's layout source and output,
- the earlier uses (or the model input) that its non-parameter inputs came from.

Data flow is followed by a second, outer ``TorchFunctionMode`` that tags every
tensor produced during the forward with the set of nearest upstream uses;
ops that use no parameter pass the union of their inputs' tags on, in-place
ops merge into their target. Bound uses are keyed by their ordinal (the same
numbering as the analysis entries and the runtime taps); refused uses
(no rule covers them, or they mix samples) by ``"refused:<k>"``.

Like the analysis runs it disables dropout, forks the RNG and restores the
model's buffers, so tracing leaves no trace. It never raises on refused
uses: they are recorded.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fxdp.analysis.capture import ProbeRecorder, ProbeRun, quiet_state, select_samples
from fxdp.rules import func_name
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.rules.virtual import make_virtuals, virtual_binding

INPUT, OUTPUT = "input", "output"
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}


@dataclass
class TracedUse:
    key: Union[int, str]
    op: str
    param_names: tuple
    module: str
    layer: str
    source_shape: tuple
    output_shape: tuple
    inputs: List[Union[int, str]]
    covered: bool = True
    rule: str = ""
    reason: str = ""
    error: Optional[BaseException] = None


@dataclass
class Trace:
    batch_size: int
    uses: List[TracedUse] = field(default_factory=list)
    outputs: List[Union[int, str]] = field(default_factory=list)
    forward_flops: Optional[int] = None

    @property
    def bound(self) -> List[TracedUse]:
        return [u for u in self.uses if u.covered]


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


class Provenance(TorchFunctionMode):
    """Tags every tensor with the keys of the nearest upstream parameter uses."""

    def __init__(self):
        super().__init__()
        self.tags: Dict[int, tuple] = {}   # id(tensor) -> (tensor, frozenset of keys); keeps tensors alive

    def of(self, tree) -> frozenset:
        out = frozenset()
        for t in _tensors(tree):
            hit = self.tags.get(id(t))
            if hit is not None and hit[0] is t:
                out = out | hit[1]
        return out

    def tag(self, tree, keys: frozenset):
        for t in _tensors(tree):
            self.tags[id(t)] = (t, keys)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        keys = self.of((args, kwargs))
        if _is_inplace(func) and args and isinstance(args[0], torch.Tensor):
            self.tag(args[0], self.of(args[0]) | keys)
        if keys:
            self.tag(out, keys)
        return out


class FlowRecorder(ProbeRecorder):
    """Recorder of the trace run: routes bound calls like the runtime, records them."""

    batch_free_write = None  # a virtual site that writes in place is a refused use here, as at runtime

    def __init__(self, trace: Trace, provenance: Provenance, module_stack: List, lifts: Dict[int, bool],
                 params: Dict[int, str]):
        super().__init__(ProbeRun([]), analysis=None)
        self.trace = trace
        self.provenance = provenance
        self.module_stack = module_stack
        self.lift_ordinals = lifts
        self.virtual_ordinals: Dict[int, bool] = {}
        self.params = params
        self.num_bound = 0
        self.num_refused = 0

    def _where(self):
        if not self.module_stack:
            return "", ""
        name, module = self.module_stack[-1]
        return name, type(module).__name__

    def _inputs(self, tree) -> List[Union[int, str]]:
        data = [t for t in _tensors(tree) if id(t) not in self.params]
        return sorted(self.provenance.of(data), key=str)

    def virtual(self, call, interceptor):
        """Batch-free call sites the analysis made virtual parameters: the same here (same ordinals)."""
        ordinal = self.num_bound
        if not self.virtual_ordinals.get(ordinal):
            return None
        out, made = make_virtuals(call, ordinal)
        if made is None:
            return None
        self.num_bound += 1
        for u, v in made:
            interceptor.param_names[id(u)] = v.name
            interceptor.virtual_leaves.append(u)
        module, layer = self._where()
        u = made[0][0]
        self.trace.uses.append(TracedUse(ordinal, call.name, virtual_binding(call).param_names, module, layer,
                                         tuple(u.shape), tuple(u.shape), [], rule="virtual"))
        return out

    def handle(self, call, binding):
        ordinal = self.num_bound
        self.num_bound += 1
        src = binding.layout_source
        if self.lift_ordinals.get(ordinal) and src is not None:
            lifted = src.expand(self.trace.batch_size, *src.shape[1:])
            call.args = tuple(lifted if a is src else a for a in call.args)
            call.kwargs = {k: (lifted if v is src else v) for k, v in call.kwargs.items()}
            src = lifted
        inputs = self._inputs((call.args, call.kwargs))
        out = call.func(*call.args, **call.kwargs)
        self.provenance.tag(out, frozenset([ordinal]))
        module, layer = self._where()
        shape_src = src if src is not None else out
        self.trace.uses.append(TracedUse(ordinal, call.name, binding.param_names, module, layer,
                                         tuple(shape_src.shape), tuple(out.shape), inputs, rule=binding.rule.name))
        return out

    def refuse(self, exc, func, args, kwargs, out=None):
        key = f"refused:{self.num_refused}"
        self.num_refused += 1
        inputs = self._inputs((args, kwargs))
        if func is not None and out is None:
            out = func(*args, **kwargs)
        module, layer = self._where()
        first = next(iter(_tensors((args, kwargs))), None)
        src_shape = tuple(first.shape) if first is not None else ()
        out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        op = func_name(func) if func is not None else "batch statistics"
        self.trace.uses.append(TracedUse(key, op, tuple(getattr(exc, "param_names", ())), module, layer,
                                         src_shape, out_shape, inputs, covered=False, reason=str(exc), error=exc))
        if out is not None:
            self.provenance.tag(out, frozenset([key]))
        return out


@contextlib.contextmanager
def _module_tracking(model: torch.nn.Module, stack: List):
    handles = []

    def pre(name):
        def hook(module, args):
            stack.append((name, module))
        return hook

    def post(module, args, output):
        if stack and stack[-1][1] is module:
            stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def trace_model(model: torch.nn.Module, args: tuple, kwargs: dict, batch_size: int, batch_dim=0,
                samples: Optional[List[int]] = None, lifts: Optional[Dict[int, bool]] = None,
                count_flops: bool = False, virtuals: Optional[Dict[int, bool]] = None) -> Trace:
    """Trace one forward pass on the example batch (or on ``samples`` of it).

    ``batch_dim`` is the batch-dimension spec of the inputs (an int or a dict,
    ``DPConfig.batch_dim_spec``; see ``fxdp.core.inputs``).

    ``lifts`` maps ordinals of uses whose index is expanded to the batch (as
    the runtime does for lifted entries), ``virtuals`` those that make virtual
    parameters (batch-free calls, ``fxdp.rules.virtual``). With ``count_flops`` the forward's
    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``.
    """
    if samples is not None:
        args, kwargs = select_samples(args, kwargs, batch_dim, samples)
        batch_size = len(samples)
    trace = Trace(batch_size)
    params = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    provenance = Provenance()
    stack: List = []
    recorder = FlowRecorder(trace, provenance, stack, dict(lifts or {}), params)
    recorder.virtual_ordinals = dict(virtuals or {})  # batch-free call sites (analysis entries' ``virtual``)
    engine = model.__dict__.get("_fxdp_engine")
    provenance.tag((args, kwargs), frozenset([INPUT]))
    flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode
        flops = FlopCounterMode(display=False)
    with quiet_state(model), (engine.suspended() if engine is not None else contextlib.nullcontext()), \
            _module_tracking(model, stack), (flops if flops is not None else contextlib.nullcontext()):
        torch.manual_seed(20260)
        with torch.enable_grad(), provenance, ParameterInterceptor(params, recorder):
            out = model(*args, **kwargs)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    trace.outputs = sorted(provenance.of(out), key=str)
    trace.forward_flops = int(flops.get_total_flops()) if flops is not None else None
    provenance.tags.clear()
    return trace
