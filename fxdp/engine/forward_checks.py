"""Checks of every eager private forward pass: what the interceptor cannot see.

The interceptor (:mod:`fxdp.analysis.interceptor`) sees every torch call made with a trainable
*parameter* during the root module's forward. Three ways of using a parameter escape it, and
each would train the parameter with an unclipped, un-noised autograd gradient (``p.grad``):

1. a custom ``torch.autograd.Function``: its forward runs with grad mode off and its backward
   returns the parameter's gradient directly;
2. a tensor derived from the parameter before the forward (a view cached at ``__init__``,
   ``self.wt = self.fc.weight.t()``): ops see the view, not the parameter;
3. a submodule called outside the root module's forward (``model.head(model.body(x))``):
   no interceptor runs at all.

(1) and (2) are found structurally after each eager forward: :func:`unseen_uses` walks the
autograd graph of the forward's outputs; every path to a trainable parameter's gradient
accumulator must go through a tap (whose backward never returns a parameter gradient). Any
other path is refused, naming the parameter and the autograd node it came through. (3) is
refused when it happens: :func:`submodule_pre_hook` runs before every submodule that owns a
trainable parameter and refuses a call in grad mode while no private forward (or analysis run)
is open. A parameter used functionally *outside* the forward (a regulariser in the loss, or a data term
such as ``F.linear(x, model.fc.weight)``) is not a use fxdp can see: it reaches ``p.grad``, which
the optimizer refuses (``public_grads="refuse"``) or adds only for parameters no privatized forward
used on data in that step (``"add"``, :mod:`fxdp.training.release_check`).

Compiled forwards (``torch.compile(model, backend="fxdp")``) run the same walk, with the graph's
captures as taps: :mod:`fxdp.engine.compiled_checks`.

Buffers (section 7 of issue #13): a buffer updated from the batch during a training forward
(an EMA normaliser, running statistics) is released by ``state_dict`` without clipping or noise.
:class:`BufferWatch` compares the version counter and identity of every buffer -- and of every frozen
parameter (``requires_grad=False``), which ``state_dict`` releases the same way -- before and after
the forward (eager and compiled: a compiled graph's input mutations are written back to the tensor)
and refuses a change unless it is declared public (``privatize(..., public_buffers=[names])``) or is
torch's spectral-norm power iteration, which reads the weights only: u, v must then hold exactly the values
that iteration gives from their values at the start of the forward (:mod:`fxdp.analysis.weight_buffers`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from fxdp.analysis import autograd_hooks
from fxdp.analysis.weight_buffers import PowerIterations
from fxdp.core.errors import PrivacyError, SampleMixingError, UncoveredParameterError
from fxdp.engine.compiled_hook import ISLANDS
from fxdp.engine.tap import TapFunction, VirtualLink

# Private forwards and analysis runs in progress (any engine): a parameterised submodule called
# in grad mode while this is zero runs outside every privatized forward.
_OPEN = [0]


class open_forward:
    """Context (or explicit enter/exit) marking a private forward or analysis run as open; while one is, user
    autograd hooks are guarded (:mod:`fxdp.analysis.autograd_hooks`)."""

    def __enter__(self):
        autograd_hooks.guard()
        _OPEN[0] += 1
        return self

    def __exit__(self, *exc):
        if _OPEN[0] > 0:
            autograd_hooks.unguard()
        _OPEN[0] = max(0, _OPEN[0] - 1)
        return False


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _untraced_forward(module) -> bool:
    """The module's forward is ``torch._dynamo.disable``'d (read from the instance's dict and the class, not
    from the bound method: dynamo would guard on the identity of each instance's method)."""
    forward = module.__dict__.get("forward", None) or type(module).forward
    return bool(getattr(forward, "_torchdynamo_disable", False))


def submodule_pre_hook(module, args):
    """Refuse a call of a parameterised submodule outside every private forward (see module doc). Inside
    a compiled forward pass, a submodule whose hooks run eagerly runs between compiled regions: its parameter
    uses go through the eager interceptor (:data:`fxdp.engine.compiled_hook.ISLANDS`)."""
    if torch.compiler.is_compiling():
        # traced; a forward dynamo will not trace runs eagerly after these hooks: open its island eagerly
        if ISLANDS[0] is not None and _untraced_forward(module):
            ISLANDS[0][2](module, args)
        return
    if not torch.is_grad_enabled():
        return
    if _OPEN[0] > 0:
        if ISLANDS[0] is not None:
            ISLANDS[0][0](module, args)
        return
    if not _owns_trainable(module):
        return
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    raise UncoveredParameterError(
        f"fxdp: submodule {type(module).__name__} (parameters {', '.join(names)}) of a privatized model was called "
        "outside the model's forward in grad mode: its parameters would get an autograd gradient that is never "
        "clipped (a submodule called outside the root forward). Call it inside the privatized model's forward "
        "(privatize the module that contains the whole computation), or under torch.no_grad(), or freeze it.")


def submodule_post_hook(module, args, output):
    """End of a submodule's forward: an eager island it opened is closed."""
    if ISLANDS[0] is None:
        return
    if torch.compiler.is_compiling():
        if _untraced_forward(module):
            ISLANDS[0][3](module)
        return
    ISLANDS[0][1](module)


def refuse_backward_hooks(model: nn.Module) -> None:
    """Module backward hooks (``register_full_backward_hook`` / ``_pre_hook``, global or on a module of the
    model) run in backward, where fxdp's checks do not see them, and may replace gradients flowing into the
    model's layers after or before the taps read them (``g + g.sum(0)``, gated on the batch size: 2.7 R).
    Refused in a private forward."""
    from torch.nn.modules import module as torch_module

    hooked = ["<global>"] if (torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks) else []
    hooked += [name or "<root>" for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if hooked:
        raise PrivacyError(
            f"fxdp: module backward hook(s) on {', '.join(hooked[:5])}: they run in backward, where fxdp's checks do "
            "not see them, and can change the gradients reaching the layers (mix samples, rescale after the "
            "per-sample norms). Remove them while training privately (read gradients with a forward-time "
            "Tensor.register_hook that returns None, or after the step).")


def install_submodule_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if name and any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(submodule_pre_hook)
            # not always_call: dynamo would guard on each instance's hook id (a recompile per model instance);
            # an island left open by a forward that raised is closed when the root forward ends
            m.register_forward_hook(submodule_post_hook)


def remove_submodule_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for hid in [k for k, fn in m._forward_pre_hooks.items() if fn is submodule_pre_hook]:
            del m._forward_pre_hooks[hid]
        for hid in [k for k, fn in m._forward_hooks.items() if fn is submodule_post_hook]:
            del m._forward_hooks[hid]


# ----------------------------------------------------------------- unseen uses in the graph
def _tensors(output) -> List[torch.Tensor]:
    leaves, _ = tree_flatten(output)
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif hasattr(x, "values") and callable(x.values):  # mappings pytree does not know (ModelOutput)
            out.extend(_tensors(list(x.values())))
        elif isinstance(x, (list, tuple)):
            out.extend(_tensors(list(x)))
    return out


def _describe(node) -> str:
    cls = getattr(node, "_forward_cls", None)
    if cls is not None:
        return f"the custom torch.autograd.Function {cls.__qualname__}"
    return (f"autograd node {type(node).__name__} outside any tapped op (a tensor derived from the parameter "
            "before the forward, e.g. a view cached at __init__)")


def is_tap(node) -> bool:
    """An eager tap's autograd node, or a virtual parameter's link to its sources (their parameter inputs get
    no gradient)."""
    return getattr(node, "_forward_cls", None) in (TapFunction, VirtualLink)


tensors_of = _tensors


def unseen_uses(output, trainable: Dict[int, str], is_tap=is_tap) -> List[Tuple[str, str]]:
    """(parameter name, how) for every path from ``output`` to a trainable parameter's gradient that
    does not go through a tap (an autograd node for which ``is_tap(node)`` holds: the eager taps;
    compiled forwards add the graph's, :mod:`fxdp.engine.compiled_checks`)."""
    found: List[Tuple[str, str]] = []
    stack, seen = [], set()
    for t in _tensors(output):
        if t.requires_grad and t.grad_fn is None and id(t) in trainable:
            found.append((trainable[id(t)], "the forward's output itself (a parameter returned as an output)"))
        elif t.grad_fn is not None:
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        tap = is_tap(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:  # AccumulateGrad: a leaf
                if not tap and id(var) in trainable:
                    found.append((trainable[id(var)], _describe(node)))
                continue
            stack.append(nxt)
    return found


def refuse_unseen_uses(output, trainable: Dict[int, str], is_tap=is_tap) -> None:
    found = unseen_uses(output, trainable, is_tap)
    if not found:
        return
    lines = "; ".join(f"{n} through {how}" for n, how in dict(found).items())
    exc = UncoveredParameterError(
        f"fxdp: trainable parameter(s) reach the forward's output without passing a per-sample rule: {lines}. Their "
        "autograd gradient would bypass clipping. Use the parameter itself inside the forward through supported "
        "ops (not a view or copy made before the forward; write a custom op as plain torch ops, or register a "
        "rule for it), or freeze it (requires_grad=False).")
    exc.param_names = tuple(sorted({n for n, _ in found}))
    raise exc


# ----------------------------------------------------------------------------- buffers
def _state(model: nn.Module):
    """The model's released state that no private gradient covers: buffers and frozen parameters (a running
    statistic kept as ``nn.Parameter(..., requires_grad=False)`` is in ``state_dict`` like a buffer)."""
    yield from model.named_buffers()
    if _fully_sharded(model):
        return  # FSDP2 all-gathers into (and frees) every parameter's storage each forward: versions move
    for n, p in model.named_parameters():
        if not p.requires_grad:
            yield n, p


def _fully_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


class BufferWatch:
    """Version counters and identities of a model's buffers and frozen parameters at the start of a forward.

    With ``fingerprint`` (eager forwards) also a float64 sum and norm of every floating-point buffer: a write
    through ``.data`` (``self.mean.data.mul_(0.9).add_(...)``) bypasses the version counter but changes the
    values (a change that leaves both the sum and the norm exactly as they were is not seen). Frozen
    parameters are watched by version and identity only (fingerprinting them would read every frozen base
    weight of a LoRA model twice per forward): a ``.data`` write to one is not seen in eager mode. Compiled
    forwards need no fingerprint: the graph writes a mutated input back with a copy the counter records."""

    def __init__(self, model: nn.Module, public: Iterable[str], fingerprint: bool = False):
        self.model = model
        self.iterations = PowerIterations(model)  # u, v: checked by value, not by version
        self.public = frozenset(public) | self.iterations.names
        self.before = {n: (id(b), b._version) for n, b in _state(model) if n not in self.public}
        self.sums = self._fingerprint() if fingerprint else None

    def _fingerprint(self):
        names, parts = [], []
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n not in self.public and (b.is_floating_point() or b.is_complex()) and b.numel():
                    names.append(n)
                    v = torch.view_as_real(b) if b.is_complex() else b
                    parts.append(torch.stack([torch.sum(v, dtype=torch.float64),
                                              torch.linalg.vector_norm(v, dtype=torch.float64)]))
        return names, parts

    def changed(self) -> List[str]:
        after = {n: (id(b), b._version) for n, b in _state(self.model) if n not in self.public}
        out = {n for n, v in self.before.items() if after.get(n) != v}
        out.update(self.iterations.unexplained())
        if self.sums is not None and self.sums[0]:
            names, now = self._fingerprint()
            if names == self.sums[0]:
                device = now[0].device
                differs = torch.stack([((a != b) & ~(a.isnan() & b.isnan())).any().to(device)
                                       for a, b in zip(self.sums[1], now)]).tolist()  # one sync
                out.update(n for n, d in zip(names, differs) if d)
        return sorted(out)

    def check(self) -> None:
        changed = self.changed()
        if changed:
            raise PrivacyError(
                f"fxdp: buffer(s) {', '.join(changed[:5])} were updated during a private training forward; a buffer "
                "(or a frozen parameter, requires_grad=False) computed from the batch (an EMA normaliser, running "
                "statistics) is released by state_dict() without clipping or noise. Update it under "
                "torch.no_grad() from public data only, or, if it does not depend on the data (a step counter), "
                "declare it with fxdp.privatize(..., public_buffers=[names]).")


def check_public_buffers(model: nn.Module, public: Iterable[str]) -> frozenset:
    names = frozenset(public or ())
    known = {n for n, _ in _state(model)}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"fxdp: public_buffers {unknown} are not buffers (or frozen parameters) of the model "
                         f"(known: {sorted(known)[:8]}).")
    return names


# ------------------------------------------------------- sample mixing: re-validation (issue #13 §6)
def revalidate_sequence(engine, table, signature: int, args, kwargs, batch_size: int) -> None:
    """Analyse a forward on all its samples when its call sequence is not one the analysis saw
    (:mod:`fxdp.analysis.mixing_monitor`); raises what the analysis finds. The analysis vouches for a
    call sequence only if its own run on this input takes it: a path chosen by anything but the input (a
    random draw -- torch's, numpy's, Python's -- global state, a counter) may be one the analysis runs,
    seeded alike, never take, and what that path does with the samples is unchecked: refused."""
    if table is None or batch_size < 2:
        return
    validated = table.validated_signatures
    if signature in validated:
        return
    analysis = engine.analyse(args, kwargs, batch_size, probe_size=batch_size)
    base = analysis.runs.get("base")
    if base is not None and base.signature != signature:
        raise SampleMixingError(
            "fxdp: this training forward took a path (a sequence of calls that can move values across the "
            "batch) that the analysis, run again on the same input, does not take: the forward's control flow "
            "depends on something other than its input -- a random draw (torch.rand, np.random, random: e.g. "
            "a mixup or augmentation applied with probability p, HuggingFace layerdrop), global state or a "
            "counter. fxdp cannot check what that path does with the samples, so this batch is refused. Draw "
            "such decisions outside the model and pass them in as inputs (or as module attributes set before "
            "the forward), so that the path is a function of what the model is given.")
    if len(validated) < 64:
        validated.add(signature)
