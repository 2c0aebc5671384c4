"""Where one DP training step spends its time, per phase, next to the non-private step (torch.profiler).

    python examples/profile_step.py [--modes plain,fxdp,plain-compiled,fxdp-compiled] [--steps 3] [--vocab 5000]

The model and step are those of ``examples/benchmark.py`` (GPT-2 4 layers, d=256, T=128, B=16, all-layer
clipping). Phases, in ms per step and % of the step (profiled steps are slower than unprofiled ones; compare
the percentages and the fxdp rows against the plain step of the same run):

- forward bookkeeping: the engine's per-forward work (input batch dims, structure key, opening/closing the
  interceptor, buffer and sequence checks);
- forward taps: eager taps (the op re-run with detached parameters, inputs kept for the norms); compiled
  regions get ``fxdp::forward_token`` instead;
- fxdp::stash: the compiled taps' hand-over of backward buffers to the engine (and copies inside it);
- finalize, split into rule factors (per-sample gradient factors), instantiation (per-sample gradients of
  the low-rank uses whose norm is computed by instantiation, reused by their clipped sums), norms (ghost
  Grams, norms of dense per-sample gradients, cross terms), clip factors, clipped sums (one GEMM /
  index_add / weighted sum per use) and the rest (Python overhead of the finalize pipeline: loops,
  dicts, dtype checks, the writer registry).

Each phase is a ``record_function`` label put around fxdp's functions by monkeypatching this process only.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FINALIZE_PARTS = ("rule factors", "instantiation", "norms", "clip factors", "clipped sums")


def _wrap(owner, name, label, static=False):
    fn = getattr(owner, name, None)
    if fn is None or getattr(fn, "_fxdp_label", None):
        return

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)
    wrapped._fxdp_label = label
    setattr(owner, name, staticmethod(wrapped) if static else wrapped)


def instrument() -> None:
    """Label fxdp's phases (see the module docstring)."""
    from fxdp.engine import engine as E
    from fxdp.engine.tap import TapFunction
    from fxdp.rules import factors as F
    from fxdp.rules.base import Rule
    _wrap(E.Engine, "before_forward", "forward bookkeeping")
    _wrap(E.Engine, "after_forward", "forward bookkeeping")
    _wrap(TapFunction, "forward", "forward taps", static=True)
    _wrap(E.Engine, "finalize", "finalize")
    for name in ("sq_norm", "inner"):
        _wrap(F, name, "norms")
    _wrap(F, "prepare", "instantiation")
    _wrap(F, "clipped_sum", "clipped sums")
    _wrap(E, "clip_groups", "clip factors")
    todo = list(Rule.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "factors" in cls.__dict__:
            _wrap(cls, "factors", "rule factors")


def _outermost_totals(events) -> dict:
    """ms per label, counting a label only where no enclosing event has the same label (no double count)."""
    out: dict = {}
    for e in events:
        p, nested = e.cpu_parent, False
        while p is not None:
            if p.name == e.name:
                nested = True
                break
            p = p.cpu_parent
        if not nested:
            out[e.name] = out.get(e.name, 0.0) + e.cpu_time_total / 1e3
    return out


def profile_mode(mode: str, steps: int, vocab: int) -> dict:
    from examples.benchmark import make_step
    step = make_step(mode, "cpu", vocab=vocab)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("step"):
                step()
    events = list(prof.events())
    totals = {k: v / steps for k, v in _outermost_totals(events).items()}
    stash = sum(e.cpu_time_total for e in events if e.name.startswith("fxdp::stash")) / 1e3 / steps
    clones = 0.0
    for e in events:
        if e.name == "aten::clone":
            p = e.cpu_parent
            while p is not None and not p.name.startswith("fxdp::stash"):
                p = p.cpu_parent
            clones += 0.0 if p is None else e.cpu_time_total / 1e3 / steps
    fin = totals.get("finalize", 0.0)
    rows = {"step": totals.get("step", 0.0),
            "forward bookkeeping": totals.get("forward bookkeeping", 0.0),
            "forward taps": totals.get("forward taps", 0.0),
            "fxdp::stash": stash, "  copies in fxdp::stash": clones,
            "finalize": fin}
    for part in FINALIZE_PARTS:
        rows["  " + part] = totals.get(part, 0.0)
    rows["  rest (Python)"] = max(fin - sum(totals.get(p, 0.0) for p in FINALIZE_PARTS), 0.0)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="plain,fxdp,plain-compiled,fxdp-compiled")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=5000)
    args = ap.parse_args()
    instrument()
    results = {m: profile_mode(m, args.steps, args.vocab) for m in args.modes.split(",")}
    from tabulate import tabulate
    names = list(next(iter(results.values())))
    headers = ["phase (ms / step, % of step)"] + list(results)
    table = []
    for n in names:
        row = [n]
        for m, r in results.items():
            pct = 100 * r[n] / max(r["step"], 1e-9)
            row.append(f"{r[n]:7.1f}  {pct:5.1f} %" if n != "step" else f"{r[n]:7.1f}")
        table.append(row)
    print(f"GPT-2 4x256, T=128, B=16, vocab {args.vocab}, {torch.get_num_threads()} threads, "
          f"{args.steps} profiled steps; load average {os.getloadavg()[0]:.2f}")
    print(tabulate(table, headers=headers))


if __name__ == "__main__":
    main()
