"""``fxdp.explain``: what privatize would do with a model, without training.

The report runs the same analysis as the first privatized forward pass, but
collects problems instead of raising them, so it also explains models that
privatize refuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from tabulate import tabulate

from ..config import DPConfig, make_config
from ..errors import UncoveredParameterError
from ..passes.plan_groups import GroupPlan, owner, plan_groups
from ..rules.factors import norm_decision


@dataclass
class Report:
    rows: List[Dict[str, Any]]
    groups: List[List[str]]
    group_labels: List[str]
    thresholds: List[float]
    uncovered: List[str]
    problems: List[str]
    config: DPConfig
    num_params: int = 0
    num_covered: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in self.rows],
            "groups": self.groups, "group_labels": self.group_labels, "thresholds": self.thresholds,
            "uncovered": self.uncovered, "problems": self.problems, "config": self.config.as_kwargs(),
            "num_params": self.num_params, "num_covered": self.num_covered,
        }

    def __str__(self) -> str:
        cols = ["#", "module", "op", "rule", "input", "output", "batch", "norm", "group"]
        table = tabulate([[r.get(c, "") for c in cols] for r in self.rows], headers=cols)
        lines = [table, "",
                 f"parameters covered: {self.num_covered}/{self.num_params}   "
                 f"style: {self.config.style.value}   R = {self.config.max_grad_norm:g}   "
                 f"clipping: {self.config.clipping_fn.value}",
                 f"clip groups: {len(self.groups)}, threshold R/sqrt(G) = "
                 f"{self.thresholds[0] if self.thresholds else float('nan'):.4g} each"]
        for label, g in zip(self.group_labels, self.groups):
            lines.append(f"  {label}: {len(g)} tensors")
        if self.uncovered:
            lines.append("UNCOVERED parameters (privatize refuses): " + ", ".join(self.uncovered))
        for p in self.problems:
            lines.append("problem: " + p)
        return "\n".join(lines)


def _norm_method(entry, batch_size: int) -> str:
    rule = entry.binding.rule.name
    o = entry.binding.options
    if entry.layout is None or "weight" not in entry.binding.roles:
        return "instantiate" if rule not in ("embedding",) else "ghost"
    if rule in ("linear", "addmm", "matmul"):
        n_in = o["in"]
        T = max(1, math.prod(entry.source_shape) // max(batch_size, 1) // max(n_in, 1))
        m, n = (o["out"], o["in"]) if rule == "linear" else (o["in"], o["out"])
        return norm_decision(T, m, n)
    if rule == "conv":
        T = math.prod(entry.output_shape[2:]) if len(entry.output_shape) > 2 else 1
        s = entry.binding.rule.shape_summary(entry.binding)
        return norm_decision(T, s["m"], s["n"])
    if rule == "embedding":
        return "ghost"
    return "instantiate"


def explain(model, *example_args, **kwargs) -> Report:
    """Analyse ``model`` on an example batch; see :class:`Report`.

    Keyword arguments of ``privatize`` (style, max_grad_norm, clipping_fn,
    block_heads, ...) select the configuration; on an already privatized model
    its own configuration is used. All other keywords go to the model.
    """
    from ..api import get_engine
    from ..runtime.engine import Engine, batch_size_of

    cfg_keys = ("style", "max_grad_norm", "clipping_fn", "numerical_stability_constant", "loss_reduction",
                "block_heads", "batch_dim")
    cfg_kwargs = {k: kwargs.pop(k) for k in cfg_keys if k in kwargs}
    engine = get_engine(model)
    if engine is not None and not cfg_kwargs:
        config, plan = engine.config, engine.plan
    else:
        config = make_config(**cfg_kwargs)
        plan = plan_groups(model, config)
    tmp = engine or Engine(model, config, plan)
    B = batch_size_of(example_args, kwargs, config.batch_dim_spec)
    analysis = tmp.analyse(example_args, kwargs, B, strict=False) if B >= 2 else None
    return build_report(model, config, plan, analysis, B)


def build_report(model, config: DPConfig, plan: GroupPlan, analysis, batch_size: int) -> Report:
    rows, used = [], set()
    entries = analysis.entries if analysis is not None else []
    for e in entries:
        used.update(e.param_names)
        labels = sorted({plan.labels[plan.group_of[n]] for n in e.param_names if n in plan.group_of})
        rows.append({
            "#": e.ordinal, "module": owner(e.param_names[0]) or "<root>", "op": e.op, "rule": e.rule,
            "params": list(e.param_names), "input": tuple(e.source_shape), "output": tuple(e.output_shape),
            "batch": (e.layout.describe() if e.layout is not None else "?") + (" (lifted)" if e.lift else ""),
            "norm": _norm_method(e, len(analysis.runs["base"].samples)), "group": ", ".join(labels),
            "path": "graph tap" if not e.reason else e.reason,
        })
    problems = analysis.problems if analysis is not None else []
    uncovered = sorted({n for p in problems if isinstance(p, UncoveredParameterError)
                        for n in getattr(p, "param_names", ())})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    threshold = config.group_threshold(plan.num_groups)
    return Report(rows=rows, groups=[list(g) for g in plan.groups], group_labels=list(plan.labels),
                  thresholds=[threshold] * plan.num_groups, uncovered=uncovered,
                  problems=[str(p) for p in problems], config=config, num_params=len(names),
                  num_covered=len([n for n in names if n in used and n not in uncovered]))
