"""Debug dumps of the analysis pipeline.

| variable         | effect                                                        |
|------------------|---------------------------------------------------------------|
| FXDP_DEBUG=1     | one summary line per analysed region on stderr                |
| FXDP_DEBUG=2     | also the analysis after every pass, one file per pass, in     |
|                  | ``$FXDP_DUMP_DIR/<region>_<n>/<NN>_<pass>.txt``               |
| FXDP_DUMP_DIR    | where dumps go (default ``./fxdp_dump``)                      |
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

_counter = itertools.count()


def debug_level() -> int:
    try:
        return int(os.environ.get("FXDP_DEBUG", "0") or 0)
    except ValueError:
        return 1


def describe_analysis(analysis) -> str:
    lines = [f"batch_size={analysis.batch_size} batch_dim={analysis.batch_dim} strict={analysis.strict}",
             f"runs: {', '.join(f'{k}={v.samples}' for k, v in analysis.runs.items())}"]
    for e in analysis.entries:
        layout = e.layout.describe() if e.layout is not None else "?"
        lines.append(f"  [{e.ordinal:3d}] {e.op:<28} {e.rule:<11} {','.join(e.param_names):<50} "
                     f"src={e.source_shape} out={e.output_shape} layout={layout}"
                     f"{' lift' if e.lift else ''}{' !' + e.reason if e.reason else ''}")
    for i, layout in enumerate(analysis.output_layouts):
        lines.append(f"  output {i}: {layout.describe() if layout is not None else '?'}")
    for p in analysis.problems:
        lines.append(f"  problem: {p}")
    return "\n".join(lines) + "\n"


def dump_hook(region: str):
    """A pipeline dump callback per FXDP_DEBUG, or None when dumps are off."""
    level = debug_level()
    if level <= 0:
        return None
    n = next(_counter)
    folder = Path(os.environ.get("FXDP_DUMP_DIR", "fxdp_dump")) / f"{region}_{n}"

    def dump(pass_name: str, index: int, analysis):
        if level >= 2:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:02d}_{pass_name}.txt").write_text(describe_analysis(analysis))
        if pass_name != "input" and index > 0 and level >= 1 and pass_name == "verify_lifts":
            print(f"fxdp[{region}_{n}]: {len(analysis.entries)} parameter uses, "
                  f"{len(analysis.problems)} problems", file=sys.stderr)

    return dump
