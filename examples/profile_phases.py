"""Where a DP training step spends its time, per phase (used by ``benchmark.py --profile MODE``).

Phases: forward and backward of the model (autograd, compiled or eager), ``fxdp::stash`` (the
compiled taps' hand-over in backward, and the copies inside it), the engine's finalize at the end of
backward, and within it the per-layer rules (building factors: ghost-norm Grams or instantiation
inputs), the norms (squared norms and cross terms of factors) and the clipped sums (one GEMM per use).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def _wrap(owner, name, label):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)
    setattr(owner, name, wrapped)


def instrument():
    """Label fxdp's phases for torch.profiler (monkeypatches this process only)."""
    from fxdp.engine import engine as E
    from fxdp.rules import factors as F
    from fxdp.rules.base import Rule
    _wrap(E.Engine, "finalize", "phase: finalize")
    _wrap(F, "sq_norm", "phase: norms")
    _wrap(F, "inner", "phase: norms")
    _wrap(F, "clipped_sum", "phase: clipped sums")
    seen, todo = set(), list(Rule.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "factors" in cls.__dict__ and cls not in seen:
            seen.add(cls)
            _wrap(cls, "factors", "phase: rule factors (Grams, instantiation)")


def _self_and_children(events):
    by_name = {}
    for e in events:
        by_name.setdefault(e.name, 0.0)
        by_name[e.name] += e.cpu_time_total / 1e3
    return by_name


def profile_steps(step, steps: int = 3) -> None:
    instrument()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("phase: step"):
                step()
    events = prof.events()
    totals = _self_and_children([e for e in events if e.name.startswith("phase: ") or e.name.startswith("fxdp::")
                                 or e.name in ("autograd::engine::evaluate_function: CompiledFunctionBackward",
                                               "CompiledFunction", "CompiledFunctionBackward")])
    clones_in_stash = 0.0
    for e in events:
        if e.name == "aten::clone":
            p = e.cpu_parent
            while p is not None and not p.name.startswith("fxdp::stash"):
                p = p.cpu_parent
            if p is not None:
                clones_in_stash += e.cpu_time_total / 1e3
    total = totals.get("phase: step", 0.0) / steps
    print(f"per step: {total:.1f} ms")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        if name != "phase: step":
            print(f"  {name:<60s} {ms / steps:8.1f} ms  {100 * ms / steps / max(total, 1e-9):5.1f} %")
    print(f"  {'copies inside fxdp::stash (aten::clone)':<60s} {clones_in_stash / steps:8.1f} ms  "
          f"{100 * clones_in_stash / steps / max(total, 1e-9):5.1f} %")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
