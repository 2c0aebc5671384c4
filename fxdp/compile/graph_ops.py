"""In-graph taps: what a region compiled by the ``"fxdp"`` backend hands the engine.

The backend (:mod:`fxdp.compile.region`) rewrites every covered use of a
trainable parameter in a dynamo graph into

* the op itself with the parameter *detached* -- autograd never computes the
  plain weight gradient, and ``p.grad`` is never written;
* :func:`capture` on the op's output (and on each parameter broadcast inside
  an elementwise op): an identity in the forward whose backward passes the
  incoming gradient on and hands it, with the tensors the rule needs, to
  ``fxdp::stash``;
* one ``fxdp::forward_token`` per region, which at run time ties the region to
  the engine's open forward pass and numbers its call sites. The engine is
  found at run time from the trainable parameters the region receives (the
  graph names no engine): dynamo reuses a graph for every instance of a class,
  so a graph compiled for one model runs, checked, for another.

Both custom ops are registered as ordered side effects, so aot_autograd and
inductor keep them and keep their order; everything else -- the op, its input
gradients -- stays ordinary graph code that inductor fuses. ``fxdp::stash``
calls the same engine code as the eager taps: the per-layer rules, the norms
of the whole model and the clip factors are computed once, at the end of
backward, across every region of the forward pass.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from fxdp.core.errors import PrivacyError
from fxdp.rules.base import Binding

OUTPUT_SLOT = -1

_ENGINES: Dict[int, "weakref.ref"] = {}
_SITES: Dict[int, "CompiledSite"] = {}
_REGIONS: Dict[int, "RegionPlan"] = {}
_uids = itertools.count(1)
# Model classes backend "fxdp" has compiled a region for (graphs are shared by the instances of a class):
# tells "compiled with another backend" from "dynamo ran the frame uncompiled" in refusals.
COMPILED_CLASSES: "weakref.WeakSet" = weakref.WeakSet()


def register_engine(engine) -> int:
    """A process-unique id under which compiled graphs find ``engine`` at run time."""
    uid = next(_uids)
    _ENGINES[uid] = weakref.ref(engine, lambda _, u=uid: _ENGINES.pop(u, None))
    return uid


def live_engines():
    """Every privatized engine that has compiled forwards, alive now."""
    return [e for e in (ref() for ref in list(_ENGINES.values())) if e is not None]


def engine_by_uid(uid: int):
    ref = _ENGINES.get(uid)
    engine = ref() if ref is not None else None
    if engine is None:
        raise PrivacyError("fxdp: a compiled graph refers to a privatized model that no longer exists; "
                           "compile the model again.")
    return engine


@dataclass(frozen=True)
class SiteCheck:
    """What the compiling engine's analysis said about one call site, re-checked for every engine the
    graph runs for: the same rule binds the same parameter names there, with the same lift."""

    ordinal: int
    rule: str
    param_names: Tuple[str, ...]
    lift: bool


@dataclass(eq=False)
class RegionPlan:
    """What one compiled region needs at run time, independent of any engine.

    ``param_names`` are the names of the trainable parameters the region receives, in the order
    the graph passes them to ``fxdp::forward_token``; ``sites`` its call sites' checks."""

    param_names: Tuple[str, ...]
    first_ordinal: int
    sites: Tuple[SiteCheck, ...]
    uid: int = 0
    verified: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # layout tables already checked


def register_region(plan: RegionPlan) -> int:
    plan.uid = next(_uids)
    _REGIONS[plan.uid] = plan
    return plan.uid


def _same(p, q) -> bool:
    return p is q or (p.shape == q.shape and p.dtype == q.dtype and p.device == q.device
                      and p.data_ptr() == q.data_ptr())


def owner_of(plan: RegionPlan, params: List[torch.Tensor]):
    """The engine whose open compiled forward pass this region is part of.

    Candidates are the engines with an open compiled forward pass whose model names every parameter
    of ``plan`` with the shape and dtype the region receives, and at least one of them is the very
    tensor received (identity for all is too strict: inductor may hand the op a re-laid-out copy of
    a conv weight). Anything else -- no such engine, or two -- is refused."""
    owners = []
    for engine in live_engines():
        ctx = engine.current_forward
        if ctx is None or not ctx.compiled:
            continue
        mine = [ctx.params.get(n) for n in plan.param_names]
        if all(q is not None and q.shape == p.shape and q.dtype == p.dtype for q, p in zip(mine, params)):
            owners.append((engine, mine))
    owners = [(e, mine) for e, mine in owners if any(_same(p, q) for p, q in zip(params, mine))]
    if not owners:
        raise PrivacyError(
            "fxdp: a compiled region that uses a privatized model's parameters ran outside a forward pass of that "
            "model in grad mode (fxdp did not see the pass start), or in a forward pass of a model that does not "
            "have these parameters. Call the compiled model itself: torch.compile(model, backend=\"fxdp\")(inputs).")
    if len(owners) > 1:
        raise PrivacyError("fxdp: a compiled region ran while forward passes of several privatized models with "
                           "these parameters were open; fxdp cannot tell which one it belongs to. Run one "
                           "privatized model's forward pass at a time.")
    return owners[0][0]


@dataclass(eq=False)
class CompiledSite:
    """One call site of a compiled region: what the rule needs to read its captures.

    ``template`` is the binding found at compile time without its tensors;
    ``saved_names`` orders the tensors captured with the output gradient;
    ``source`` names the saved tensor that locates the samples (None: the output).
    """

    ordinal: int
    op: str
    template: Binding
    saved_names: Tuple[str, ...]
    source: Optional[str]
    broadcast_roles: Tuple[str, ...] = ()
    uid: int = field(default=0)

    def binding(self, params: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor]) -> Binding:
        """A fresh binding for one forward pass, with the model's parameters and this pass's tensors."""
        b = self.template
        return replace(b, params={r: params[n] for r, n in b.roles.items()}, saved=saved,
                       layout_source=saved.get(self.source) if self.source else None,
                       options=dict(b.options))


def register_site(site: CompiledSite) -> int:
    site.uid = next(_uids)
    _SITES[site.uid] = site
    return site.uid


def release_sites(uids) -> None:
    for uid in uids:
        _SITES.pop(uid, None)
        _REGIONS.pop(uid, None)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fxdp::forward_token", mutates_args=())
def forward_token(region_uid: int, params: List[torch.Tensor]) -> torch.Tensor:
    """Run time: ``(engine id, forward id)`` of the open compiled forward pass that owns ``params``,
    as a (2,) int64 tensor.

    Refuses a region whose parameters belong to no privatized model's open forward pass, to
    several, or to a model whose names or analysis differ from the one it was compiled for."""
    plan = _REGIONS.get(region_uid)
    if plan is None:
        raise PrivacyError("fxdp: a compiled region whose plan was released ran again; compile the model again.")
    return owner_of(plan, params).compiled_forwards.enter_region(plan, params)


@forward_token.register_fake
def _forward_token_fake(region_uid, params):
    return torch.empty((2,), dtype=torch.int64)


@torch.library.custom_op("fxdp::stash", mutates_args=())
def stash(token: torch.Tensor, site_uid: int, slot: int, grad: torch.Tensor, saved: List[torch.Tensor]) -> None:
    """Backward: hand one captured gradient (and the rule's tensors) to the engine named by ``token``.

    No copies: the engine keeps references to the tensors until the end of backward. That is safe
    because nothing writes into them afterwards -- the graph is functional, and the backend turns off
    inductor's buffer reuse and in-place buffers for fxdp graphs (which would otherwise store another
    result in a buffer once this op, its last reader in the graph, has run)."""
    site = _SITES.get(site_uid)
    if site is None:
        raise PrivacyError("fxdp: backward through a compiled graph whose call sites were released; "
                           "compile the model again.")
    engine_uid, cid = (int(v) for v in token.tolist())
    engine_by_uid(engine_uid).compiled_forwards.receive(cid, site, slot, grad, list(saved))


@stash.register_fake
def _stash_fake(token, site_uid, slot, grad, saved):
    return None


for _op in (torch.ops.fxdp.forward_token.default, torch.ops.fxdp.stash.default):
    torch.library._register_effectful_op(_op, torch._library.effects.EffectType.ORDERED)


class Capture(torch.autograd.Function):
    """Identity on ``value``; its backward stashes the gradient of ``value``.

    The parameters are inputs so that the output requires grad exactly when the
    original op's did; their gradient is None -- the engine writes private_grad."""

    @staticmethod
    def forward(ctx, value, token, site_uid, slot, num_params, *rest):
        ctx.site_uid, ctx.slot, ctx.num_rest = site_uid, slot, len(rest)
        ctx.save_for_backward(token, *rest[num_params:])
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        token, *saved = ctx.saved_tensors
        torch.ops.fxdp.stash(token, ctx.site_uid, ctx.slot, grad, saved)
        return (grad, None, None, None, None) + (None,) * ctx.num_rest


def capture(value, token, site_uid: int, slot: int, num_params: int, *rest):
    """Graph-level entry point of :class:`Capture` (an fx ``call_function`` target)."""
    return Capture.apply(value, token, site_uid, slot, num_params, *rest)


def expand_for(param: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``param`` broadcast to the shape of the elementwise op it enters (symbolic sizes welcome)."""
    return param.expand(torch.broadcast_shapes(param.shape, *(o.shape for o in others)))


def lift_to_batch(source: torch.Tensor, batch_size) -> torch.Tensor:
    """A (1, ...) tensor expanded to (B, ...) -- position ids shared by the batch."""
    return source.expand(batch_size, *source.shape[1:])
