"""Passes over one dynamo region (an fx graph of torch-level calls) for backend "fxdp".

Pipeline, each a small function ``Region -> PassResult(region, modified)``:

0. :func:`inline_checkpoints` -- activation-checkpointed bodies
   (``tag_activation_checkpoint``) inlined, so that their parameter uses are
   tapped like any other (exact; activations kept, warned).
1. :func:`find_parameters` -- which graph inputs are trainable parameters of a
   privatized model, and that model's open forward pass (compiled regions of
   an unprivatized model are refused: never non-private training).
2. :func:`bind_call_sites` -- runs the graph once on its example inputs under
   the same interceptor as eager ``privatize``: every call that uses a
   trainable parameter is bound by the same rule registry (or refused with the
   same error), and mapped to its graph node; outputs the graph later modifies
   in place are marked.
3. :func:`match_analysis` -- call sites are numbered in graph order, after
   those of earlier regions of the same forward pass, and checked against the
   eager analysis of the forward (batch layouts, lifts) by parameter names.
4. :func:`insert_taps` -- the rewrite of :mod:`fxdp.compile.graph_ops`:
   detached parameters, captures on outputs and broadcast parameters, lifted
   position ids, one forward token.
5. :func:`check_no_direct_use` -- no trainable parameter reaches a node that
   could carry its gradient except through a capture.

Nothing about the compiling model is baked into the graph: dynamo reuses it for
other instances of the class, whose engine is found (and whose analysis is
checked against the region's call sites) at run time.

All of it runs on the torch-level graph, before aot_autograd decomposes
anything; the inner compiler (inductor by default) gets the rewritten graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fxdp.core.errors import PrivacyError, UncoveredParameterError
from fxdp.analysis.interceptor import ParameterInterceptor
from fxdp.analysis.runner import PassError, PassResult, run_passes
from fxdp.compile import graph_ops as C
from fxdp.compile.checkpoint_inline import inline_checkpoints
from fxdp.compile.composite_taps import is_composite, positions_of
from fxdp.compile.identity_dropout import alias_source, remove_aliases
from fxdp.compile.refusals import untraced_recurrent
from fxdp.compile.virtual_taps import bind_virtual, refuse_virtual_from_earlier_region


@dataclass
class BoundSite:
    """A graph node whose call uses trainable parameters, as a rule bound it.

    ``inputs`` maps the binding's tensors to the node's input nodes:
    ("param", role), ("saved", name) and ("source",) keys; ``others`` are the
    node's other tensor inputs (the shapes a broadcast parameter meets)."""

    node: fx.Node
    op: str
    binding: Any
    inputs: Dict[tuple, fx.Node] = field(default_factory=dict)
    others: List[fx.Node] = field(default_factory=list)
    ordinal: int = -1
    lift: bool = False
    composite: bool = False  # an inner call of a decomposed node: tensors located by argument position
    param_positions: tuple = ()
    saved_positions: tuple = ()
    mutated: bool = False  # the graph modifies the call's output in place (ReLU(inplace=True), ``h += r``)
    label: str = ""  # the analysis's rule label of a virtual site ("virtual (permute)")
    virtual: tuple = ()  # a batch-free call: the names of the virtual parameters it makes (fxdp.rules.virtual)
    mutated_inputs: tuple = ()  # keys of ``inputs`` whose tensors the graph modifies in place after the call


@dataclass
class Region:
    """One dynamo graph being rewritten, and what the passes learn about it."""

    gm: fx.GraphModule
    example_inputs: List[Any]
    engine: Any = None
    context: Any = None
    param_nodes: Dict[fx.Node, str] = field(default_factory=dict)  # placeholder -> parameter name
    values: Dict[fx.Node, Any] = field(default_factory=dict)  # placeholder -> example value
    sites: List[BoundSite] = field(default_factory=list)
    benign: set = field(default_factory=set)  # nodes that read trainable parameters without a gradient
    first_ordinal: int = 0
    site_uids: List[int] = field(default_factory=list)
    plan_ids: List[int] = field(default_factory=list)  # composite-op plans, released with the graph
    virtual_nodes: Dict[fx.Node, str] = field(default_factory=dict)  # node -> the virtual parameter it holds
    crossing: List[fx.Node] = field(default_factory=list)  # virtual parameters the graph returns


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def find_parameters(region: Region) -> PassResult:
    """Map trainable-parameter graph inputs to their privatized model's engine and names."""
    owners = {}
    for engine in C.live_engines():
        for name, p in engine.model.named_parameters():
            if p.requires_grad:
                owners[id(p)] = (engine, name)
    found = set()
    for node, value in zip(_placeholders(region.gm), region.example_inputs):
        region.values[node] = value
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            if id(value) not in owners:
                raise PrivacyError(
                    f"fxdp backend: a compiled region uses trainable parameter {node.target} of a model that is "
                    "not privatized; its gradient would not be clipped. Call fxdp.privatize(model) before "
                    "torch.compile(model, backend=\"fxdp\"), or freeze the parameter.")
            engine, name = owners[id(value)]
            found.add(id(engine))
            region.engine = engine
            region.param_nodes[node] = name
    if len(found) > 1:
        raise PrivacyError("fxdp backend: one compiled region uses parameters of two privatized models; one loss "
                           "must have one engine. Privatize the module that contains both.")
    if region.engine is not None:
        ctx = region.engine.current_forward
        if ctx is None or not ctx.compiled:
            raise PrivacyError(
                "fxdp backend: the privatized model's parameters are traced outside its own forward pass, or the "
                "model was compiled through an enclosing function. Compile the privatized model itself: "
                "torch.compile(model, backend=\"fxdp\").")
        region.context = ctx
        C.COMPILED_CLASSES.add(type(region.engine.model))
        _refuse_untraced_recurrent(region.engine.model)
    return PassResult(region, False)


def _refuse_untraced_recurrent(model) -> None:
    """Dynamo does not trace into ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` unless ``torch._dynamo.config.allow_rnn``
    is set: it breaks the graph and runs the layer uncompiled, where no tap sees its weights. Refused up front,
    with the fix (:func:`fxdp.compile.refusals.untraced_recurrent`; with the flag set, the fused op is one graph
    node, replayed as the recurrence of :mod:`fxdp.rules.recurrent` with each step's linear ops tapped)."""
    if getattr(torch._dynamo.config, "allow_rnn", True):
        return
    rnns = [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.RNNBase) and any(p.requires_grad for p in m.parameters())]
    if rnns:
        raise untraced_recurrent(rnns)


class _SiteRecorder:
    """Recorder for the interceptor: records each bound call with the node being run; a call the
    forward's analysis found batch-free makes virtual parameters, as in eager mode."""

    def __init__(self, interpreter, table=None, first_ordinal: int = 0):
        self.interpreter = interpreter
        self.sites: List[BoundSite] = []
        self.read = {}  # id(site) -> [(key, tensor, its version when the call read it)]
        self.table = table
        self.first_ordinal = first_ordinal

    def virtual(self, call, interceptor):
        """At a call site the eager analysis found batch-free: virtual parameters (fxdp.rules.virtual)."""
        node = self.interpreter.current
        made = bind_virtual(call, interceptor, self.table, self.first_ordinal + len(self.sites), node,
                            self.interpreter.sample_nodes,
                            node.op == "call_function" and is_composite(node.target)
                            or any(s.node is node for s in self.sites))
        if made is None:
            return None
        out, binding, names = made
        self.interpreter.virtual_leaves.update(names)
        self.sites.append(BoundSite(node, call.name, binding, virtual=tuple(names.values())))
        return out

    def substitute(self, func, args, kwargs):
        return None

    def refuse(self, exc, func, args, kwargs, out=None):
        raise exc

    def handle(self, call, binding):
        node = self.interpreter.current
        if node.op == "call_function" and is_composite(node.target):
            if binding.broadcast or binding.layout_source is not None and \
                    not any(binding.layout_source is t for t in binding.saved.values()):
                raise UncoveredParameterError(
                    f"fxdp backend: {node.target.__name__} uses {', '.join(binding.param_names)} in a form fxdp "
                    "cannot tap inside a compiled graph (a broadcast parameter); use eager fxdp.privatize.")
            site = BoundSite(node, call.name, binding, composite=True,
                             param_positions=positions_of(call, list(binding.params.values())),
                             saved_positions=positions_of(call, list(binding.saved.values())))
            self.sites.append(site)
            return call.func(*call.args, **call.kwargs)
        if any(s.node is node for s in self.sites):
            raise UncoveredParameterError(
                f"fxdp backend: graph node {node.name} ({call.name}) is a composite op using trainable parameters "
                "several times; fxdp cannot tap it inside a compiled graph.")
        env = self.interpreter.env
        by_id = {id(env[a]): a for a in node.all_input_nodes if a in env}
        site = BoundSite(node, call.name, binding)
        wanted = [(("param", r), t) for r, t in binding.params.items()]
        wanted += [(("saved", k), t) for k, t in binding.saved.items()]
        if binding.layout_source is not None:
            wanted.append((("source",), binding.layout_source))
        self.read[id(site)] = [(key, t, t._version) for key, t in wanted if key[0] != "param"]
        for key, t in wanted:
            if id(t) not in by_id:
                raise UncoveredParameterError(
                    f"fxdp backend: graph node {node.name} ({call.name}) passes {key[-1]!r} to its rule as a "
                    "tensor made inside the call; fxdp cannot tap it inside a compiled graph.")
            site.inputs[key] = by_id[id(t)]
        params = {id(t) for t in binding.params.values()}
        site.others = [a for a in node.all_input_nodes
                       if a in env and isinstance(env[a], torch.Tensor) and id(env[a]) not in params]
        self.sites.append(site)
        return call.func(*call.args, **call.kwargs)


class _NodeTracking(fx.Interpreter):
    """Runs the graph, remembering the node being run; records nodes that read a trainable
    parameter without being a call site (their result must not carry a gradient)."""

    current: Optional[fx.Node] = None

    def __init__(self, gm, param_nodes, recorder_sites, fixed_nodes=frozenset()):
        super().__init__(gm)
        self.param_nodes = set(param_nodes)
        self.fixed_nodes = fixed_nodes  # placeholders that cannot carry the samples (see bind_call_sites)
        self.sample_nodes = set()  # nodes whose tensors may depend on the samples (not only on sizes)
        self.recorder_sites = recorder_sites
        self.benign = set()
        self.outputs = {}  # call-site node -> its output tensors and their versions when made
        self.virtual_leaves: Dict[int, str] = {}  # id(virtual parameter) -> its name
        self.virtual_nodes: Dict[fx.Node, str] = {}  # nodes whose value is a virtual parameter
        self.crossing: List[fx.Node] = []  # virtual-parameter nodes the graph returns (a graph break follows)
        self.aliases: Dict[fx.Node, fx.Node] = {}  # inactive dropout on a (virtual) parameter -> its input

    def mutated(self, node) -> bool:
        """Whether the rest of the graph modified the call site's output (or a view of it) in place."""
        return any(t._version != v for t, v in self.outputs.get(node, ()))

    def run_node(self, n):
        self.current = n
        result = super().run_node(n)
        has_tensor = any(isinstance(t, torch.Tensor) for t in tree_flatten(result)[0])
        if has_tensor and (n not in self.fixed_nodes if n.op == "placeholder"
                           else any(a in self.sample_nodes for a in n.all_input_nodes)):
            self.sample_nodes.add(n)
        source = alias_source(n, result, self.env, self.param_nodes)
        if source is not None:  # its input itself: read like that input from here on (fxdp.compile.identity_dropout)
            self.aliases[n] = source
            self.param_nodes.add(n)
            return result
        if isinstance(result, torch.Tensor) and id(result) in self.virtual_leaves:
            # a virtual parameter (or one output of a call making several): read like a parameter from here on
            self.virtual_nodes[n] = self.virtual_leaves[id(result)]
            self.param_nodes.add(n)
            return result
        if any(s.node is n for s in self.recorder_sites()):
            self.outputs[n] = [(t, t._version) for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        returned = [self.aliases.get(a, a) for a in n.all_input_nodes]
        if n.op == "output" and not [a for a in returned if a in self.param_nodes and a not in self.virtual_nodes]:
            # virtual parameters returned at a graph break: handed on detached (insert_taps), so that no
            # gradient reaches the parameters through them; a later use needing one fails the analysis match
            self.crossing = list(dict.fromkeys(a for a in returned if a in self.virtual_nodes))
            return result
        if n.op != "placeholder" and self.param_nodes.intersection(n.all_input_nodes) \
                and not any(s.node is n for s in self.recorder_sites()):
            leaves, _ = tree_flatten(result)
            if any(_carries_gradient(t, n, self.env) for t in leaves):
                raise UncoveredParameterError(
                    f"fxdp backend: graph node {n.name} ({n.target}) uses a trainable parameter where no rule "
                    "covers it; its gradient would bypass clipping.")
            self.benign.add(n)
        return result


def _carries_gradient(t, node: fx.Node, env) -> bool:
    """Whether a node's result can pass a gradient on to the parameters it read. A view taken while grad
    mode is off (``weight_mat.t()`` in spectral norm's ``torch.no_grad`` power iteration) keeps
    ``requires_grad`` but is a leaf of its own, with no gradient path to its base (as in eager mode, where
    the interceptor passes no-grad calls through); an input handed back as it is (``p.contiguous()``)
    still carries one."""
    if not (isinstance(t, torch.Tensor) and t.requires_grad):
        return False
    if torch.is_grad_enabled() or t.grad_fn is not None:
        return True
    return any(env.get(a) is t for a in node.all_input_nodes)


def _concrete(v):
    """An example input the graph can run on: tensors other than parameters copied; a symbolic size
    (dynamo passes SymInts for dynamic dimensions) replaced by its value in this call."""
    if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
        return v.clone()
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
        return guarding_hint_or_throw(v)
    return v


def bind_call_sites(region: Region) -> PassResult:
    """Bind every call that uses a trainable parameter, by running the graph once (RNG forked,
    inputs other than parameters copied, so the run leaves no trace)."""
    if region.engine is None:
        return PassResult(region, False)
    recorder = None
    model = region.engine.model
    # inputs that may carry the samples: the model's batched inputs and activations that carry a gradient
    batched = {id(t) for t, _ in region.context.batch_inputs} if region.context is not None else set()
    params = {id(t) for t in model.parameters()}
    fixed = frozenset(n for n, v in region.values.items() if id(v) in params or (
        isinstance(v, torch.Tensor) and not v.requires_grad and id(v) not in batched))
    interp = _NodeTracking(region.gm, region.param_nodes, lambda: recorder.sites, fixed)
    ctx = region.context
    recorder = _SiteRecorder(interp, ctx.table if ctx is not None else None, ctx.next_ordinal if ctx is not None else 0)
    ids = {id(region.values[n]): name for n, name in region.param_nodes.items()}
    inputs = [_concrete(v) for v in region.example_inputs]
    devices = [v.device for v in inputs if isinstance(v, torch.Tensor) and v.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})), torch.enable_grad(), \
            ParameterInterceptor(ids, recorder):
        interp.run(*inputs)
    region.benign = interp.benign
    region.sites = recorder.sites
    region.virtual_nodes = interp.virtual_nodes
    region.crossing = interp.crossing
    for site in region.sites:
        site.mutated = interp.mutated(site.node)
        site.mutated_inputs = tuple(k for k, t, v in recorder.read.get(id(site), ()) if t._version != v)
    remove_aliases(region.gm, interp.aliases, region.sites, {**region.param_nodes, **interp.virtual_nodes})
    return PassResult(region, bool(interp.aliases))


def match_analysis(region: Region) -> PassResult:
    """Number the sites after the forward's earlier regions and check them against its analysis."""
    ctx = region.context
    if ctx is None:
        return PassResult(region, False)
    region.first_ordinal = ctx.next_ordinal
    table = ctx.table
    for i, site in enumerate(region.sites):
        site.ordinal = region.first_ordinal + i
        if table is None:
            continue
        names = site.binding.param_names
        rule = site.binding.rule.name
        if site.virtual:
            if not (site.ordinal < len(table.keys) and table.virtual[site.ordinal]
                    and tuple(table.keys[site.ordinal][1]) == names):
                rule = f"virtual ({site.binding.options.get('kind', 'vjp')})"
            else:
                site.label = table.rules[site.ordinal]
                continue
        if not table.matches(site.ordinal, rule, names):
            seen = (f"{table.keys[site.ordinal][0]} bound by the {table.rules[site.ordinal]} rule using "
                    f"{', '.join(table.keys[site.ordinal][1])}" if site.ordinal < len(table.keys) else "nothing")
            refuse_virtual_from_earlier_region(table, site.ordinal, region.sites, seen)
            raise PrivacyError(
                f"fxdp backend: compiled call site {site.ordinal} ({site.op} bound by the {rule} rule using "
                f"{', '.join(names)}) does not match the eager analysis of the forward pass, which saw {seen} "
                "there. Either a parameter use ran outside the compiled graph (code dynamo does not trace, where "
                "fxdp cannot see it), or the graph spells a use differently from the model's Python code (please "
                "report the model). Eager fxdp.privatize, without torch.compile, covers the model.")
        site.lift = bool(table.lifts[site.ordinal])
    return PassResult(region, False)


def run_region_passes(region: Region) -> Region:
    """inline_checkpoints -> find_parameters -> bind_call_sites -> match_analysis -> insert_taps -> check_no_direct_use,
    linting after each rewrite, dumping each pass's graph with FXDP_DEBUG >= 2, naming a failing pass."""
    from fxdp.analysis.dumps import debug_level, new_dump_folder
    from fxdp.compile.insert_taps import check_no_direct_use, insert_taps

    folder = new_dump_folder("compile") if debug_level() >= 2 else None
    if folder is not None:
        (folder / "00_dynamo_graph.txt").write_text(region.gm.print_readable(print_output=False))
    passes = (inline_checkpoints, find_parameters, bind_call_sites, match_analysis, insert_taps,
              check_no_direct_use)

    def recompile(_name, result: PassResult):
        if result.modified:
            result.subject.gm.graph.lint()
            result.subject.gm.recompile()

    def dump(name, index, subject):
        if folder is not None and index > 0:
            (folder / f"{index:02d}_{name}.txt").write_text(subject.gm.print_readable(print_output=False))

    region = run_passes(region, passes, label="compile", after_pass=recompile, dump=dump)
    return region
