"""``fxdp.explain``: what privatize would do with a model, without training.

The report runs the same analysis pipeline (``fxdp.analysis.PIPELINE``) as the
first privatized forward pass, with ``strict=False`` so that problems are
collected instead of raised -- it also explains models that privatize refuses
-- and one traced forward pass on the whole example batch (real shapes, the
calling modules, data flow between uses, refused uses, FLOPs). Clip groups
are the engine's plan itself when the model is privatized, otherwise
``plan_groups`` on the same config, the function privatize calls.

Guarantee: ``explain`` raises only for invalid arguments (an unknown style, a
non-positive R); whatever the model does, problems end up in the report.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from fxdp.core.config import DPConfig, make_config
from fxdp.core.errors import BatchLayoutError, PrivacyError, UncoveredParameterError
from fxdp.analysis import PIPELINE, Analysis, run_pipeline
from fxdp.analysis.runner import PassError
from fxdp.analysis.plan_groups import GroupPlan, block_labels, owner, plan_groups
from fxdp.report.block_graph import build_block_graph
from fxdp.report.cost import evaluate, family_and_dims
from fxdp.report.debug import PassTracker, dump_hook, status_of
from fxdp.report.overhead import reference_length
from fxdp.report.result import Report
from fxdp.report.trace import Trace, trace_model

CONFIG_KEYS = ("style", "max_grad_norm", "clipping_fn", "numerical_stability_constant", "loss_reduction",
               "block_heads", "batch_dim")

__all__ = ["Report", "explain"]


def explain(model, *example_args, **kwargs) -> Report:
    """Analyse ``model`` on an example batch and return a :class:`Report`.

    ``fxdp.explain(model, *example_args, style=..., **example_kwargs)``: the
    keyword arguments of ``privatize`` (style, max_grad_norm, clipping_fn,
    numerical_stability_constant, loss_reduction, block_heads, batch_dim) select
    the configuration -- on a privatized model without them, its own
    configuration and clip groups are used; every other keyword goes to the
    model. The example batch needs at least 2 samples to locate them.

    Raises:
        ValueError: invalid configuration arguments (as privatize would).
    """
    from fxdp.engine.install import get_engine
    from fxdp.engine.recorder import batch_size_of

    cfg_kwargs = {k: kwargs.pop(k) for k in CONFIG_KEYS if k in kwargs}
    engine = get_engine(model)
    problems: List[BaseException] = []
    if engine is not None and not cfg_kwargs:
        config, plan = engine.config, engine.plan
    else:
        config = make_config(**cfg_kwargs)
        try:
            plan = plan_groups(model, config)
        except ValueError as exc:
            problems.append(exc)
            plan = GroupPlan((), (), {})
    try:
        B = batch_size_of(example_args, kwargs, config.batch_dim_spec)
    except BatchLayoutError as exc:
        problems.append(exc)
        B = 0
    tracker = PassTracker()
    analysis = None
    if B >= 2 and plan.num_groups:
        analysis = Analysis(model, example_args, kwargs, B, config.batch_dim_spec, strict=False)
        try:
            analysis = run_pipeline(analysis, PIPELINE, dump_hook("explain", tracker, plan))
        except (PrivacyError, PassError) as exc:
            problems.append(exc)
    elif B == 1:
        problems.append(BatchLayoutError(
            "fxdp: explain needs an example batch of at least 2 samples to locate the samples in every "
            "tensor; pass a larger example batch."))
    notes: List[str] = []
    trace: Optional[Trace] = None
    if B >= 1 and plan.num_groups:
        lifts = {e.ordinal: e.lift for e in analysis.entries} if analysis is not None else {}
        virtuals = {e.ordinal: e.virtual for e in analysis.entries} if analysis is not None else {}
        for count_flops in (True, False):
            # torch's FlopCounterMode hooks every module's inputs (ModuleTracker); a module fed a parameter
            # fxdp's trace replays batch-free (DeBERTa's pos_dropout on rel_embeddings) breaks those hooks
            try:
                trace = trace_model(model, example_args, kwargs, B, config.batch_dim_spec, lifts=lifts,
                                    count_flops=count_flops, virtuals=virtuals)
                break
            except Exception as exc:  # the model's own forward failed: the report says so instead of raising
                failure = f"{type(exc).__name__}: {exc}"
                notes.append(f"forward FLOPs not measured (torch's FlopCounterMode failed: {failure})" if count_flops
                             else f"the traced forward pass on the example batch failed: {failure}")
    if analysis is not None:
        problems = list(analysis.problems) + problems
    if engine is not None and config is engine.config and engine.clip_bound.owner is not None:
        notes.append("clipping bound " + engine.clip_bound.describe())
    return build_report(model, config, plan, analysis, tracker, trace, B, problems, notes)


def _itemsize(model) -> int:
    import torch

    return 8 if any(p.dtype == torch.float64 for p in model.parameters()) else 4


def _layout_text(entry) -> str:
    if entry is None or entry.layout is None:
        return "?"
    return entry.layout.describe() + (" (lifted)" if entry.lift else "")


def _entry_row(e, used, B: int, tracker: PassTracker) -> Dict[str, Any]:
    """Row of an analysis entry; ``used`` is its traced use at the example batch (or None)."""
    src = used.source_shape if used is not None else e.source_shape
    out = used.output_shape if used is not None else e.output_shape
    family, dims = family_and_dims(e.rule, e.binding, src, out, B)
    roles = dict(e.binding.roles)
    status = tracker.status.get(e.ordinal, "problem") if e.reason else "ok"
    row = {"key": e.ordinal, "module": used.module if used is not None else owner(e.param_names[0]),
           "layer": used.layer if used is not None else "", "op": e.op, "rule": e.rule,
           "params": list(e.param_names), "roles": roles, "input": list(src), "output": list(out),
           "batch": _layout_text(e), "family": family, "dims": dims, "decision": None, "costs": {},
           "path": ("tap, index lifted to the batch" if e.lift else "tap") if status == "ok" else "refused",
           "status": status, "reason": e.reason, "made_by": tracker.made_by.get(e.ordinal, ""),
           "changed_by": list(tracker.changed_by.get(e.ordinal, []))}
    if family is not None and B >= 1:
        ev = evaluate(family, roles, dims, B)
        row["decision"] = ev["decision"]
        row["costs"] = {k: {f: v[f] for f in ("flops", "workspace", "extra_flops", "memory")}
                        for k, v in ev["methods"].items()}
    return row


def _refused_row(u) -> Dict[str, Any]:
    return {"key": u.key, "module": u.module, "layer": u.layer, "op": u.op, "rule": "", "params": list(u.param_names),
            "roles": {}, "input": list(u.source_shape), "output": list(u.output_shape), "batch": "?",
            "family": None, "dims": {}, "decision": None, "costs": {}, "path": "refused",
            "status": status_of(u.error), "reason": u.reason, "made_by": "", "changed_by": []}


def _rows(analysis, tracker, trace: Optional[Trace], B: int, notes: List[str]) -> List[Dict[str, Any]]:
    entries = analysis.entries if analysis is not None else []
    if trace is None:
        n = len(analysis.runs["base"].samples) if analysis is not None and "base" in analysis.runs else B
        return [_entry_row(e, None, n, tracker) for e in entries]
    bound = trace.bound
    same = [(u.op, tuple(u.param_names)) for u in bound] == [(e.op, tuple(e.param_names)) for e in entries]
    if analysis is not None and not same:
        notes.append("the forward pass on the whole example batch used the parameters in another sequence "
                     "than the analysis samples (data-dependent control flow); rows show the analysis samples.")
        n = len(analysis.runs["base"].samples)
        return [_entry_row(e, None, n, tracker) for e in entries] + \
            [_refused_row(u) for u in trace.uses if not u.covered]
    by_ordinal = {e.ordinal: e for e in entries}
    rows = []
    for u in trace.uses:
        if not u.covered:
            rows.append(_refused_row(u))
        elif u.key in by_ordinal:
            rows.append(_entry_row(by_ordinal[u.key], u, trace.batch_size, tracker))
        else:  # no analysis (batch of one): the trace alone
            rows.append({**_refused_row(u), "rule": u.rule, "path": "tap", "status": "ok",
                         "batch": "dim 0 (batch of one)"})
    return rows


def _problem(exc: BaseException) -> Dict[str, Any]:
    return {"kind": type(exc).__name__, "message": str(exc), "params": list(getattr(exc, "param_names", ()))}


def build_report(model, config: DPConfig, plan: GroupPlan, analysis, tracker: PassTracker, trace: Optional[Trace],
                 batch_size: int, problems: List[BaseException], notes: List[str]) -> Report:
    rows = _rows(analysis, tracker, trace, batch_size, notes)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    blocks = block_labels(model, list(trainable), config.block_heads) if trainable else {}
    label_of = {n: plan.labels[g] for n, g in plan.group_of.items()}
    for r in rows:
        r["group"] = ", ".join(sorted({label_of[n] for n in r["params"] if n in label_of}))
        r["block"] = ", ".join(sorted({blocks[n] for n in r["params"] if n in blocks}))
    uncovered = {n for r in rows if r["status"] == "uncovered" for n in r["params"]}
    uncovered |= {n for p in problems if isinstance(p, UncoveredParameterError) for n in getattr(p, "param_names", ())}
    bad = {n for r in rows if r["status"] != "ok" for n in r["params"]} | uncovered
    used = {n for r in rows for n in r["params"]}
    # only a complete traced forward tells which parameters are never used
    unused = [n for n in trainable if n not in used] if trace is not None else []
    graph = build_block_graph(trace, rows, list(dict.fromkeys(blocks.values()))) if trace is not None \
        else build_block_graph(Trace(batch_size), [], [])
    return Report(
        rows=rows, plan=plan, config=config, batch_size=max(batch_size, 1),
        seq_len=reference_length([r for r in rows if r.get("family")]), itemsize=_itemsize(model),
        uncovered=sorted(n for n in uncovered if n in trainable), unused=unused,
        problems=[_problem(p) for p in problems], num_params=len(trainable),
        covered=[n for n in trainable if n in used and n not in bad],
        param_sizes={n: int(math.prod(p.shape)) for n, p in trainable.items()}, blocks=blocks, block_graph=graph,
        forward_flops=trace.forward_flops if trace is not None else None, notes=notes)
