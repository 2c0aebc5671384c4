"""Virtual parameters inside a compiled region (backend "fxdp").

A call that uses trainable parameters only through batch-free ops (``W.t()``, ``table[index]``,
``logit_scale.exp()``, ``torch._weight_norm(v, g)``; see :mod:`fxdp.rules.virtual`) makes a *virtual
parameter* ``u = f(theta)``. In eager mode the interceptor replaces ``u`` by a fresh leaf and appends a
:class:`~fxdp.rules.virtual.VirtualParam` to the forward pass; the engine's finalize maps ``u``'s
per-sample factors back to ``theta`` (``resolve_virtuals``). A compiled region does the same:

* the node computing ``u`` stays in the graph; every reader of ``u`` is rewritten like a reader of a
  parameter (the op on ``u.detach()``, its output captured), so no gradient flows from ``u`` to ``theta``
  through autograd -- ``theta``'s gradient is formed by the engine only;
* right after the node, the ordered side-effect op ``fxdp::virtual`` receives the node's inputs at run
  time (parameters and earlier virtual parameters detached, fixed indices, symbolic sizes) and replays
  the node under the same interceptor hook as eager mode (:func:`fxdp.rules.virtual.make_virtuals`):
  the same ``VirtualParam`` record, with this forward pass's values, is appended to the forward
  pass's ``virtuals``, and ``u``'s value is registered under its name for the rules of its readers.

At compile time :func:`bind_virtual` makes the region's virtual parameters where the forward's analysis
found a batch-free call (same ordinal, op and parameters), exactly as the eager recorder does. Nothing is
duplicated: the maths is ``resolve_virtuals``'s, run by the engine's one finalize.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from fxdp.core.errors import PrivacyError, UncoveredParameterError
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.rules.base import root_names_of as _roots
from fxdp.rules.virtual import make_virtuals, virtual_binding

_VIRTUAL_SITES: Dict[int, "VirtualSite"] = {}
_uids = itertools.count(1)


@dataclass(frozen=True)
class _In:
    """Position of a node input in the run-time lists of ``fxdp::virtual`` (``kind``: "t", "i" or "f")."""

    kind: str
    index: int


@dataclass(eq=False)
class VirtualSite:
    """How to replay one batch-free graph node at run time.

    ``target`` / ``opcode`` as in the fx node; ``args`` / ``kwargs`` the node's arguments with its input
    nodes replaced by :class:`_In` positions; ``tensor_names`` the (virtual) parameter name of each tensor
    input, None for other tensors (fixed indices); ``names`` the virtual parameters the node makes."""

    ordinal: int
    opcode: str
    target: Any
    args: tuple
    kwargs: dict
    tensor_names: Tuple[Optional[str], ...]
    names: Tuple[str, ...]
    uid: int = field(default=0)

    def replay(self, tensors: List[torch.Tensor], ints: List[int], floats: List[float]):
        """Run the node on run-time inputs under the interceptor: (virtual leaves, VirtualParam records)."""
        def value(a):
            return {"t": tensors, "i": ints, "f": floats}[a.kind][a.index]
        args = fx.node.map_aggregate(self.args, lambda a: value(a) if isinstance(a, _In) else a)
        kwargs = fx.node.map_aggregate(self.kwargs, lambda a: value(a) if isinstance(a, _In) else a)
        names = {id(t): n for t, n in zip(tensors, self.tensor_names) if n is not None}
        maker = _Maker(self.ordinal)
        # a custom op runs below autograd; make_virtuals needs it to see which results are differentiable
        with torch.enable_grad(), torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality,
                                                                       False), ParameterInterceptor(names, maker):
            if self.opcode == "call_method":
                getattr(args[0], self.target)(*args[1:], **kwargs)
            else:
                self.target(*args, **kwargs)
        if maker.made is None or tuple(v.name for _, v in maker.made) != self.names:
            got = () if maker.made is None else tuple(v.name for _, v in maker.made)
            raise PrivacyError(
                f"fxdp: a compiled batch-free call site ({self.target}) made virtual parameters {got} at run time, "
                f"not {self.names} as when it was compiled; this is a bug in fxdp, please report the model. "
                "Eager fxdp.privatize covers it.")
        return maker.made


class _Maker:
    """Interceptor recorder of a replay: the first call using the named tensors makes the virtual parameters."""

    def __init__(self, ordinal: int):
        self.ordinal = ordinal
        self.made = None

    def substitute(self, func, args, kwargs):
        return None

    def refuse(self, exc, func, args, kwargs, out=None):
        raise exc

    def virtual(self, call, interceptor):
        if self.made is not None:
            return None
        out, made = make_virtuals(call, self.ordinal)
        self.made = made
        return out

    def handle(self, call, binding):
        raise PrivacyError(f"fxdp: replaying a compiled batch-free call site bound {call.name} to the "
                           f"{binding.rule.name} rule; this is a bug in fxdp, please report the model.")


def bind_virtual(call, interceptor, table, ordinal: int, node: fx.Node, sample_nodes, inside_composite: bool):
    """Compile time, while a region's graph runs under the interceptor: if the forward's analysis found the
    call at ``ordinal`` batch-free (same op, same parameters), make its virtual parameters as eager mode
    does and register them with ``interceptor``; returns (output, binding, {id(leaf): name}) or None.
    Refused: such a call reading a tensor computed from the model's inputs (the analysis and the graph
    disagree), or inside a composite op."""
    if table is None or ordinal >= len(table.virtual) or not table.virtual[ordinal]:
        return None
    binding = virtual_binding(call)
    if tuple(table.keys[ordinal]) != (call.name, binding.param_names):
        return None  # match_analysis refuses the mismatch
    out, made = make_virtuals(call, ordinal)
    if made is None:  # no differentiable result (a metadata read): not the site
        return None
    if any(a in sample_nodes for a in node.all_input_nodes):
        raise UncoveredParameterError(
            f"fxdp backend: the forward's analysis found {call.name} on {', '.join(_roots(binding.param_names))} "
            f"batch-free, but graph node {node.name} reads a tensor computed from the model's inputs; fxdp "
            "cannot tell the two apart inside a compiled graph. Use eager fxdp.privatize for this model.")
    if inside_composite:
        raise UncoveredParameterError(
            f"fxdp backend: graph node {node.name} transforms {', '.join(_roots(binding.param_names))} "
            f"batch-free ({call.name}) inside a composite op; fxdp cannot tap that inside a compiled graph. "
            "Use eager fxdp.privatize for this model.")
    for u, v in made:
        interceptor.param_names[id(u)] = v.name
        interceptor.virtual_leaves.append(u)
    binding.options["kind"] = made[0][1].kind
    return out, binding, {id(u): v.name for u, v in made}


def refuse_virtual_from_earlier_region(table, ordinal: int, sites, seen: str) -> None:
    """A call site the analysis saw using a virtual parameter this region did not make (an earlier region
    made it, before a graph break): refused, saying so."""
    earlier = [n for n in (table.keys[ordinal][1] if ordinal < len(table.keys) else ())
               if "~v" in n and not any(n in s.virtual for s in sites)]
    if earlier:
        raise PrivacyError(
            f"fxdp backend: the forward's analysis saw {seen} at call site {ordinal}, but virtual parameter "
            f"{earlier[0]} (a batch-free transform of {', '.join(_roots(earlier))}) was made in an earlier "
            "compiled region, before a graph break; fxdp taps a virtual parameter only in the region that makes "
            "it. Remove the graph break (TORCH_LOGS=graph_breaks shows it), or use eager fxdp.privatize.")


def virtual_site(node: fx.Node, ordinal: int, names: Dict[fx.Node, str], values: Dict[fx.Node, Any],
                 made: Tuple[str, ...]) -> Tuple[VirtualSite, List[fx.Node], List[fx.Node], List[fx.Node]]:
    """The replay record of ``node`` and its tensor, integer and float input nodes (in the order
    ``fxdp::virtual`` receives them). ``names`` maps parameter and virtual-parameter nodes to their names;
    ``values`` holds the inputs' example values. Inputs of any other kind (a shape or a bool computed in
    the graph) are refused: they cannot be handed to the op."""
    tensor_nodes: List[fx.Node] = []
    int_nodes: List[fx.Node] = []
    float_nodes: List[fx.Node] = []
    slots: Dict[fx.Node, _In] = {}
    for a in node.all_input_nodes:
        v = values.get(a)
        if isinstance(v, torch.Tensor):
            slots[a] = _In("t", len(tensor_nodes))
            tensor_nodes.append(a)
        elif isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            slots[a] = _In("i", len(int_nodes))
            int_nodes.append(a)
        elif isinstance(v, (float, torch.SymFloat)):
            slots[a] = _In("f", len(float_nodes))
            float_nodes.append(a)
        else:
            raise UncoveredParameterError(
                f"fxdp backend: the batch-free call {node.name} ({node.target}) that transforms "
                f"{', '.join(made)} takes a {type(v).__name__} computed inside the compiled graph; fxdp cannot "
                "replay it at run time. Use eager fxdp.privatize for this model, or compute that value outside "
                "the model.")
    args = fx.node.map_arg(node.args, lambda a: slots[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: slots[a])
    site = VirtualSite(ordinal, node.op, node.target, args, kwargs,
                       tuple(names.get(a) for a in tensor_nodes), tuple(made))
    site.uid = next(_uids)
    _VIRTUAL_SITES[site.uid] = site
    return site, tensor_nodes, int_nodes, float_nodes


def release_virtual_sites(uids) -> None:
    for uid in uids:
        _VIRTUAL_SITES.pop(uid, None)


@torch.library.custom_op("fxdp::virtual", mutates_args=())
def record_virtual(token: torch.Tensor, site_uid: int, tensors: List[torch.Tensor], ints: List[int],
                   floats: List[float]) -> None:
    """Forward, run time: the virtual parameters of one compiled batch-free call site, made exactly as in
    eager mode, join the forward pass named by ``token`` (see module docstring)."""
    from fxdp.compile.graph_ops import engine_by_uid

    site = _VIRTUAL_SITES.get(site_uid)
    if site is None:
        raise PrivacyError("fxdp: a compiled graph whose batch-free call sites were released ran again; "
                           "compile the model again.")
    engine_uid, cid = (int(v) for v in token.tolist()[:2])
    ctx = engine_by_uid(engine_uid).current_forward
    if ctx is None or not ctx.compiled or ctx.cid != cid:
        raise PrivacyError("fxdp: a compiled batch-free call site ran outside the forward pass its region belongs "
                           "to; call the compiled model itself.")
    for u, v in site.replay(list(tensors), [int(i) for i in ints], [float(f) for f in floats]):
        ctx.params[v.name] = u.detach()
        ctx.virtuals.append(v)


@record_virtual.register_fake
def _record_virtual_fake(token, site_uid, tensors, ints, floats):
    return None


torch.library._register_effectful_op(torch.ops.fxdp.virtual.default, torch._library.effects.EffectType.ORDERED)
