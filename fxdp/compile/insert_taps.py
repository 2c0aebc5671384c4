"""The graph rewrite of backend "fxdp": bound call sites become in-graph taps.

For call site ``y = op(x, W, b)`` of a region (see :mod:`fxdp.compile.region`):

    token = fxdp::forward_token(region, [W, b, ...])   # once per region: finds the engine owning W, b
    y  = op(x, W.detach(), b.detach())
    y' = capture(y, token, site, OUTPUT, 2, W, b, x)                 # users of y read y'

A parameter broadcast inside an elementwise op is replaced by
``capture(expand_for(p.detach(), *other inputs), token, site, slot, 1, p)``;
a (1, T) layout source the analysis lifted is expanded to the batch size read
from the model input's (symbolic) size. An output the graph later modifies in
place (``ReLU(inplace=True)``, ``h += residual``; found when the region was
bound) is read through a ``clone`` of the capture: autograd forbids in-place
changes of a custom Function's view, and the copy is what the in-place op
changes (inductor fuses it with that op). After the rewrite
:func:`check_no_direct_use` proves that every path from a trainable
parameter to the graph's outputs goes through a capture.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import replace

import torch
import torch.fx as fx

from fxdp.core.errors import BatchLayoutError, PrivacyError
from fxdp.compile import graph_ops as C
from torch.utils._pytree import tree_flatten

from fxdp.analysis.runner import PassResult
from fxdp.compile.composite_taps import InnerSite, register_plan, run_composite
from fxdp.compile.virtual_taps import release_virtual_sites, virtual_site


def _batch_size_node(region, g: fx.Graph, after: fx.Node) -> fx.Node:
    for t, dim in region.context.batch_inputs:
        for node, value in region.values.items():
            if value is t:
                with g.inserting_after(after):
                    return g.call_method("size", (node, dim))
    raise BatchLayoutError(
        "fxdp backend: a (1, T) input of this compiled region must be expanded to the batch, but the region "
        "does not take the model's batched input (it starts after a graph break). Pass position ids of "
        "shape (B, T), or avoid the graph break.")


def _register(region, site, source_name) -> int:
    b = site.binding
    template = replace(b, params={}, saved={}, layout_source=None, options=dict(b.options))
    compiled_site = C.CompiledSite(site.ordinal, site.op, template, tuple(b.saved), source_name, tuple(b.broadcast))
    uid = C.register_site(compiled_site)
    region.site_uids.append(uid)
    return uid


def insert_taps(region) -> PassResult:
    """Rewrite every bound call site (see module docstring)."""
    if not region.sites:
        return PassResult(region, False)
    g = region.gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    params = list(region.param_nodes)
    plan = C.RegionPlan(tuple(region.param_nodes[p] for p in params), region.first_ordinal,
                        tuple(C.SiteCheck(s.ordinal, s.label or s.binding.rule.name, tuple(s.binding.param_names), bool(s.lift))
                              for s in region.sites))
    region.site_uids.append(C.register_region(plan))
    with g.inserting_after(last):
        token = g.call_function(torch.ops.fxdp.forward_token.default, (plan.uid, params))
    detached, batch_size = {}, []

    def detach(p: fx.Node) -> fx.Node:
        if p not in detached:
            with g.inserting_after(p if p in region.virtual_nodes else token):
                detached[p] = g.call_method("detach", (p,))
        return detached[p]

    composites, virtual_uids = {}, []
    for site in region.sites:
        if site.virtual:
            _record_virtual(region, site, g, token, detach, virtual_uids)
            continue
        if site.composite:
            uid = _register(region, site, next((k for k, v in site.binding.saved.items()
                                                if v is site.binding.layout_source), None))
            composites.setdefault(site.node, []).append(InnerSite(uid, site.param_positions, site.saved_positions))
            continue
        n, b = site.node, site.binding
        saved = {k: site.inputs[("saved", k)] for k in b.saved}
        source = site.inputs.get(("source",))
        source_name = next((k for k, v in saved.items() if v is source), None)
        if source is not None and source_name is None:
            source_name, saved["layout_source"] = "layout_source", source
        uid = _register(region, site, source_name)
        role_of = {site.inputs[("param", r)]: r for r in b.params}
        replacement = {}
        with g.inserting_before(n):
            if site.lift:
                if not batch_size:
                    batch_size.append(_batch_size_node(region, g, token))
                lifted = g.call_function(C.lift_to_batch, (source, batch_size[0]))
                replacement[source] = lifted
                saved = {k: (lifted if v is source else v) for k, v in saved.items()}
            for p, role in role_of.items():
                if role in b.broadcast:
                    others = [replacement.get(o, o) for o in site.others]
                    expanded = g.call_function(C.expand_for, (detach(p), *others))
                    slot = tuple(b.broadcast).index(role)
                    replacement[p] = g.call_function(C.capture, (expanded, token, uid, slot, 1, p))
                else:
                    replacement[p] = detach(p)
        n.args = fx.node.map_arg(n.args, lambda a: replacement.get(a, a))
        n.kwargs = fx.node.map_arg(n.kwargs, lambda a: replacement.get(a, a))
        params = list(role_of)
        with g.inserting_after(n):
            cap = g.call_function(C.capture, (n, token, uid, C.OUTPUT_SLOT, len(params), *params,
                                              *saved.values()))
        out = cap
        if site.mutated:  # a capture's output is a view autograd cannot let be modified: modify a copy
            with g.inserting_after(cap):
                out = g.call_method("clone", (cap,))
        n.replace_all_uses_with(out, delete_user_cb=lambda user: user is not cap)
    for n, inner in composites.items():
        leaves, _ = tree_flatten((n.args, n.kwargs))
        positions = tuple(i for i, a in enumerate(leaves) if a in region.param_nodes)
        plan_id = register_plan(n.target, inner)
        region.plan_ids.append(plan_id)
        n.args = (token, plan_id, positions) + tuple(n.args)
        n.target = run_composite
    if region.crossing:  # returned at a graph break: handed on without a gradient path to the parameters
        out = next(n for n in g.nodes if n.op == "output")
        out.args = fx.node.map_arg(out.args, lambda a: detach(a) if a in region.crossing else a)
    if virtual_uids:
        weakref.finalize(region.gm, release_virtual_sites, virtual_uids)
    return PassResult(region, True)


def _record_virtual(region, site, g: fx.Graph, token: fx.Node, detach, uids) -> None:
    """After a batch-free node: ``fxdp::virtual(token, site, [detached tensor inputs], [ints], [floats])``
    (:mod:`fxdp.compile.virtual_taps`). The node itself is left as is: its readers are call sites."""
    n = site.node
    names = {**region.param_nodes, **region.virtual_nodes}
    values = dict(region.values)
    values.update({a: a.meta.get("example_value") for a in n.all_input_nodes if a not in values})
    vsite, tensor_nodes, int_nodes, float_nodes = virtual_site(n, site.ordinal, names, values, site.virtual)
    uids.append(vsite.uid)
    tensors = [detach(a) if a in names else a for a in tensor_nodes]
    with g.inserting_after(n):
        g.call_function(torch.ops.fxdp.virtual.default, (token, vsite.uid, tensors, int_nodes, float_nodes))


def check_no_direct_use(region) -> PassResult:
    """Every reader of a trainable parameter -- or of a virtual parameter made from them -- is a detach, a
    capture, a batch-free call site making a virtual parameter, or a node seen to carry no gradient."""
    makers = {s.node for s in region.sites if s.virtual}
    names = {**region.param_nodes, **region.virtual_nodes}
    for p, name in names.items():
        for user in p.users:
            ok = (user.op == "call_method" and user.target == "detach") or user.target is C.capture \
                or user.target is run_composite or user in region.benign or user in makers \
                or user.target is torch.ops.fxdp.forward_token.default
            if not ok and user.op == "output" and p in region.virtual_nodes:
                raise PrivacyError(
                    f"fxdp backend: virtual parameter {name} (a batch-free transform of trainable parameters) "
                    "leaves the compiled region (a graph break right after it?); its gradient would reach the "
                    "parameters unclipped in the next region. Avoid the graph break, or use eager fxdp.privatize.")
            if not ok:
                raise PrivacyError(
                    f"fxdp backend: after the rewrite, graph node {user.name} ({user.target}) still reads trainable "
                    f"parameter {name} directly; its gradient would bypass clipping. This is a "
                    "bug in fxdp; please report the model.")
    for n in makers:
        if n not in region.virtual_nodes and any(
                not (u.op == "call_function" and u.target is operator.getitem and u in region.virtual_nodes)
                and u.target is not torch.ops.fxdp.virtual.default for u in n.users):
            raise PrivacyError(
                f"fxdp backend: the results of batch-free call site {n.name} are read other than one by one; "
                "fxdp cannot tap them inside a compiled graph. Use eager fxdp.privatize for this model.")
    return PassResult(region, False)
