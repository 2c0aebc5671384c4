"""Debug dumps of the analysis pipeline (owned by the pass runner), and which pass made or changed what.

Every analysed region (one per input structure of a privatized model, and one
per ``fxdp.explain`` call) runs the passes of ``fxdp.analysis.PIPELINE``.
Dumps are controlled by environment variables read at each analysis:

| variable        | effect                                                                          |
|-----------------|---------------------------------------------------------------------------------|
| FXDP_DEBUG=1    | one summary line per analysed region on stderr: batch size, parameter uses,     |
|                 | lifted uses, batch layouts found, number of problems (and the first one)        |
| FXDP_DEBUG=2    | also the analysis state before the first pass and after every pass, one file    |
|                 | per pass and region, numbered in pipeline order:                                |
|                 | ``$FXDP_DUMP_DIR/<region>_<k>/<NN>_<pass>.txt`` (``00_input.txt`` first);      |
|                 | each parameter use shows its layout, lift, problem, and the pass that made it   |
|                 | and the passes that changed it                                                  |
| FXDP_DEBUG=3    | also ``<NN>_<pass>.dot``: Graphviz DOT of the layer / block graph (uses as      |
|                 | nodes, data flow as edges, one cluster per block), the uses that pass made or   |
|                 | changed filled gold, refused / problematic uses coloured (red: uncovered,       |
|                 | orange: sample mixing, purple: batch layout). Render: ``dot -Tsvg f.dot``.      |
|                 | Costs one extra forward pass on the analysis samples per region.               |
| FXDP_DUMP_DIR   | where dumps go (default ``./fxdp_dump``); ``<k>`` numbers regions, never        |
|                 | overwriting an existing folder                                                  |

Level 3's graph drawing needs the report layer, which installs it
(:func:`install_graph_dumper`) when imported; without it level 3 dumps text only.

Unset, 0 or empty: no dumps and no cost. A non-integer FXDP_DEBUG counts as 1.
Dumps never change what the analysis decides: a failure while writing a dump
is written into the dump instead of being raised.

:class:`PassTracker` records, per analysis entry (by ordinal), the pass that
made it, the passes that changed it, and the status its problem gives it
("uncovered", "sample-mixing", "layout"); ``fxdp.explain`` uses it for the
report, the dumps use it to annotate and highlight.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from fxdp.core.errors import BatchLayoutError, SampleMixingError, UncoveredParameterError

_counter = itertools.count()

# level-3 DOT writer, installed by fxdp.report.debug: (path, title, analysis, tracker, touched, state, plan)
GRAPH_DUMPER: list = [None]


def install_graph_dumper(fn) -> None:
    GRAPH_DUMPER[0] = fn

STATUS_OF_ERROR = ((SampleMixingError, "sample-mixing"), (UncoveredParameterError, "uncovered"),
                   (BatchLayoutError, "layout"))


def debug_level() -> int:
    """FXDP_DEBUG as an int (0 when unset or empty, 1 when not an integer)."""
    try:
        return int(os.environ.get("FXDP_DEBUG", "0") or 0)
    except ValueError:
        return 1


def status_of(exc) -> str:
    for cls, status in STATUS_OF_ERROR:
        if isinstance(exc, cls):
            return status
    return "problem"


def _state(entry):
    return (entry.op, entry.rule, tuple(entry.param_names), entry.layout, bool(entry.lift), entry.reason,
            tuple(entry.source_shape), tuple(entry.output_shape))


class PassTracker:
    """Follows an analysis through the pipeline (a dump callback's bookkeeping)."""

    def __init__(self):
        self.snapshots: Dict[int, tuple] = {}
        self.made_by: Dict[int, str] = {}
        self.changed_by: Dict[int, List[str]] = {}
        self.status: Dict[int, str] = {}
        self.problem_passes: List[str] = []   # pass that collected each problem, by index
        self.passes: List[str] = []

    def observe(self, pass_name: str, analysis) -> List[int]:
        """Record the state after ``pass_name``; return the ordinals it made or changed."""
        self.passes.append(pass_name)
        new_problems = analysis.problems[len(self.problem_passes):]
        self.problem_passes.extend([pass_name] * len(new_problems))
        kinds = {status_of(p) for p in new_problems}
        kind = next(iter(kinds)) if len(kinds) == 1 else "problem"
        touched = []
        for e in analysis.entries:
            state = _state(e)
            old = self.snapshots.get(e.ordinal)
            if old == state:
                continue
            if old is None:
                self.made_by[e.ordinal] = pass_name
            else:
                self.changed_by.setdefault(e.ordinal, []).append(pass_name)
            if e.reason and (old is None or old[5] != e.reason):
                self.status[e.ordinal] = kind
            elif not e.reason:
                self.status.pop(e.ordinal, None)
            self.snapshots[e.ordinal] = state
            touched.append(e.ordinal)
        return touched

    def provenance(self, ordinal: int) -> str:
        made = self.made_by.get(ordinal, "?")
        changed = self.changed_by.get(ordinal, [])
        return f"made by {made}" + (f", changed by {', '.join(changed)}" if changed else "")


def describe_analysis(analysis, tracker: Optional[PassTracker] = None) -> str:
    """Readable state of an analysis: one line per parameter use, then outputs and problems."""
    lines = [f"batch_size={analysis.batch_size} batch_dim={analysis.batch_dim} strict={analysis.strict}",
             f"runs: {', '.join(f'{k}={v.samples}' for k, v in analysis.runs.items()) or '-'}",
             f"log: {'; '.join(analysis.log) or '-'}"]
    for e in analysis.entries:
        layout = e.layout.describe() if e.layout is not None else "?"
        line = (f"  [{e.ordinal:3d}] {e.op:<22} {e.rule:<11} {','.join(e.param_names):<40} "
                f"src={e.source_shape} out={e.output_shape} layout={layout}"
                f"{' lift' if e.lift else ''}{' !' + e.reason if e.reason else ''}")
        if tracker is not None:
            line += f"   <{tracker.provenance(e.ordinal)}>"
        lines.append(line)
    for i, layout in enumerate(analysis.output_layouts):
        lines.append(f"  output {i}: {layout.describe() if layout is not None else '?'}")
    for p in analysis.problems:
        lines.append(f"  problem ({type(p).__name__}): {p}")
    return "\n".join(lines) + "\n"


def summary_line(region: str, analysis) -> str:
    layouts: Dict[str, int] = {}
    for e in analysis.entries:
        d = e.layout.describe() if e.layout is not None else "?"
        layouts[d] = layouts.get(d, 0) + 1
    lifted = sum(1 for e in analysis.entries if e.lift)
    text = (f"fxdp[{region}]: B={analysis.batch_size}, {len(analysis.entries)} parameter uses "
            f"({lifted} lifted), layouts: {', '.join(f'{k} x{v}' for k, v in layouts.items()) or '-'}; "
            f"{len(analysis.problems)} problem(s)")
    if analysis.problems:
        first = str(analysis.problems[0]).splitlines()[0]
        text += f"; first: {first[:160]}"
    return text


def new_dump_folder(region: str) -> Path:
    root = Path(os.environ.get("FXDP_DUMP_DIR", "fxdp_dump"))
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"{region}_{next(_counter)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def dump_hook(region: str, tracker: Optional[PassTracker] = None, plan=None):
    """A pipeline callback ``(pass_name, index, analysis)`` per FXDP_DEBUG.

    Returns None when dumps are off and no ``tracker`` is given; with a tracker
    the callback always keeps it up to date (``fxdp.explain``). ``plan`` gives
    the clip groups shown in DOT dumps (default: the model's engine's plan).
    """
    level = debug_level()
    if level <= 0 and tracker is None:
        return None
    tracker = tracker if tracker is not None else PassTracker()
    folder = new_dump_folder(region) if level >= 2 else None
    state = {"folder": folder, "dot": None, "name": folder.name if folder is not None else f"{region}_{next(_counter)}"}

    def dump(pass_name: str, index: int, analysis):
        from fxdp.analysis import PIPELINE

        touched = tracker.observe(pass_name, analysis)
        if level >= 2:
            stem = state["folder"] / f"{index:02d}_{pass_name}"
            header = f"# fxdp analysis {state['name']}, after pass {index} of {len(PIPELINE)}: {pass_name}\n"
            stem.with_suffix(".txt").write_text(header + describe_analysis(analysis, tracker))
            if level >= 3 and GRAPH_DUMPER[0] is not None:
                GRAPH_DUMPER[0](stem.with_suffix(".dot"), f"{state['name']} {index:02d} {pass_name}", analysis,
                                tracker, touched, state, plan)
        if level >= 1 and index == len(PIPELINE):
            line = summary_line(state["name"], analysis)
            if state["folder"] is not None:
                line += f" (dumps: {state['folder']})"
            print(line, file=sys.stderr)

    return dump
