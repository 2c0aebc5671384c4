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
  graph names no engine; :func:`marked_region` reads them): dynamo reuses a
  graph for every instance of a class, and for every block of a model whose
  block forward it compiled once, so a graph compiled for one model or block
  runs, checked and renamed, for another.

Both custom ops are registered as ordered side effects, so aot_autograd and
inductor keep them and keep their order; everything else -- the op, its input
gradients -- stays ordinary graph code that inductor fuses. ``fxdp::stash``
calls the same engine code as the eager taps: the per-layer rules, the norms
of the whole model and the clip factors are computed once, at the end of
backward, across every region of the forward pass.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from fxdp.analysis.autograd_hooks import guarding, refuse_saved_tensor_hooks
from fxdp.core.errors import BatchLayoutError, PrivacyError
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


class EagerFallback(BatchLayoutError):
    """A region whose parameter uses fxdp cannot tap inside the graph but can run eagerly, under the same
    interceptor as eager ``privatize`` (a (1, T) layout source in a region without the batched input):
    the backend then runs the region's graph uncompiled (:func:`fxdp.compile.islands.eager_region`)."""


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

    ``param_names`` are the names (in the compiling model) of the trainable parameters the region
    receives, in the order the graph passes them to ``fxdp::forward_token``; ``sites`` its call sites'
    checks. A region may run for other parameters than it was compiled for -- another instance of the
    class, or another block of the same model whose forward dynamo compiled once (a graph break inside
    a block) -- and at other ordinals: each run is checked against the analysis of its forward pass."""

    param_names: Tuple[str, ...]
    first_ordinal: int
    sites: Tuple[SiteCheck, ...]
    uid: int = 0
    # layout table -> the (ordinal offset, parameter names) runs already checked against it
    verified: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary)


@dataclass(frozen=True)
class RegionRun:
    """One run of a region in a forward pass: its call sites' ordinals are ``site.ordinal + offset``, and
    ``rename`` maps the compiling model's parameter names to the names of the parameters received."""

    offset: int
    rename: Tuple[Tuple[str, str], ...] = ()

    def name(self, compiled_name: str) -> str:
        return dict(self.rename).get(compiled_name, compiled_name)


def register_region(plan: RegionPlan) -> int:
    plan.uid = next(_uids)
    _REGIONS[plan.uid] = plan
    return plan.uid


def owner_of(params: List[torch.Tensor]):
    """``(engine, names)``: the engine whose open compiled forward pass holds every parameter a region
    receives (the very tensors: the region's wrapper reads them from the graph's inputs), and their names
    there. No such engine, or two, is refused."""
    owners = []
    for engine in live_engines():
        ctx = engine.current_forward
        if ctx is None or not ctx.compiled:
            continue
        by_id = {id(p): n for n, p in ctx.params.items()}
        names = tuple(by_id.get(id(p)) for p in params)
        if all(n is not None for n in names):
            owners.append((engine, names))
    if not owners:
        raise PrivacyError(
            "fxdp: a compiled region that uses a privatized model's parameters ran outside a forward pass of that "
            "model in grad mode (fxdp did not see the pass start), or in a forward pass of a model that does not "
            "have these parameters. Call the compiled model itself: torch.compile(model, backend=\"fxdp\")(inputs).")
    if len(owners) > 1:
        raise PrivacyError("fxdp: a compiled region ran while forward passes of several privatized models with "
                           "these parameters were open; fxdp cannot tell which one it belongs to. Run one "
                           "privatized model's forward pass at a time.")
    return owners[0]


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

    def binding(self, params: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor],
                run: Optional[RegionRun] = None) -> Binding:
        """A fresh binding for one run, with the model's parameters (named as in ``run``) and its tensors."""
        b = self.template
        roles = {r: run.name(n) for r, n in b.roles.items()} if run is not None else dict(b.roles)
        return replace(b, roles=roles, params={r: params[n] for r, n in roles.items()}, saved=saved,
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


# --------------------------------------------------------------------------- inside a compiled region
_RUNNING = threading.local()


def in_compiled_region() -> bool:
    """True while a graph compiled by backend "fxdp" runs its forward: the ops it issues are its own
    (already tapped in the graph), not eager code for the interceptor (:mod:`fxdp.compile.islands`)."""
    return getattr(_RUNNING, "depth", 0) > 0


def marked_region(compiled, plan_uid: Optional[int] = None, positions: Tuple[int, ...] = ()):
    """``compiled`` (what the inner compiler returned), run with :func:`in_compiled_region` true.

    For a region with call sites (``plan_uid``), the trainable parameters among its inputs (at
    ``positions``) are read before it runs: they name the engine and the forward pass the run belongs
    to, whose token ``fxdp::forward_token`` then hands the graph."""
    def run(*args, **kwargs):
        tokens = _tokens()
        if guarding() and torch.is_grad_enabled():
            refuse_saved_tensor_hooks("when a compiled region of a private forward starts")
        if plan_uid is not None:
            plan = _REGIONS.get(plan_uid)
            if plan is None:
                raise PrivacyError("fxdp: a compiled region whose plan was released ran again; compile the model "
                                   "again.")
            params = [args[i] for i in positions]
            engine, names = owner_of(params)
            tokens[plan_uid] = engine.compiled_forwards.enter_region(plan, names)
        _RUNNING.depth = getattr(_RUNNING, "depth", 0) + 1
        try:
            out = compiled(*args, **kwargs)
        finally:
            _RUNNING.depth -= 1
            tokens.pop(plan_uid, None)
        if plan_uid is not None and torch.is_grad_enabled():
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    t.grad_fn.register_prehook(_refuse_double_backward)
        return out
    if getattr(compiled, "_boxed_call", False):
        run._boxed_call = True
    return run


def _refuse_double_backward(grad_outputs):
    """Backward pre-hook on a compiled region's outputs: runs before aot_autograd's backward of the region,
    which would fail on ``create_graph=True`` with a raw error of its own."""
    if torch.is_grad_enabled():
        raise PrivacyError(
            "fxdp: a backward pass with create_graph=True (double backward, e.g. an input-gradient penalty) reached "
            "the compiled privatized model. fxdp's taps give first-order gradients only (and torch.compile's "
            "backward does not support double backward): the penalty's gradient with respect to the parameters "
            "would be missing. Compute input gradients with torch.autograd.grad(loss, x) without create_graph, "
            "or train without the penalty.")


def _tokens() -> dict:
    if not hasattr(_RUNNING, "tokens"):
        _RUNNING.tokens = {}
    return _RUNNING.tokens


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fxdp::forward_token", mutates_args=())
def forward_token(region_uid: int, params: List[torch.Tensor]) -> torch.Tensor:
    """Run time: ``(engine id, forward id, run)`` of this run of the region, as a (3,) int64 tensor:
    prepared by the region's wrapper (:func:`marked_region`) from the parameters the region received,
    which also refused a run whose parameters belong to no privatized model's open forward pass, to
    several, or to a model whose analysis differs from the region's call sites. ``params`` orders the
    token after them in the graph."""
    token = _tokens().pop(region_uid, None)
    if token is None:
        raise PrivacyError("fxdp: a region compiled by backend \"fxdp\" ran without its wrapper; this is a bug "
                           "in fxdp, please report it.")
    return token


@forward_token.register_fake
def _forward_token_fake(region_uid, params):
    return torch.empty((3,), dtype=torch.int64)


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
    engine_uid, cid, run = (int(v) for v in token.tolist())
    engine_by_uid(engine_uid).compiled_forwards.receive(cid, run, site, slot, grad, list(saved))


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
