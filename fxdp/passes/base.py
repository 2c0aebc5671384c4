"""Pass infrastructure: small named passes over one :class:`Analysis`.

A pass is a function ``Analysis -> PassResult(analysis, modified)``. The
pipeline runs them in order, can dump the analysis after each pass (see
``fxdp.report.debug``), and names the failing pass in any error it re-raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import PrivacyError


@dataclass
class PassResult:
    analysis: "Analysis"
    modified: bool


@dataclass(eq=False)
class Entry:
    """One use of trainable parameters seen by the analysis (one call site)."""

    ordinal: int
    op: str
    rule: str
    param_names: tuple
    binding: Any
    source_shape: tuple
    output_shape: tuple
    layout: Any = None
    lift: bool = False
    reason: str = ""
    made_by: str = ""
    changed_by: List[str] = field(default_factory=list)
    input_layouts: Dict[str, Any] = field(default_factory=dict)  # per-sample fallback only

    def snapshot(self) -> tuple:
        return (self.layout, self.lift, self.reason, self.source_shape, self.output_shape)


@dataclass(eq=False)
class Analysis:
    """What the analysis knows about a model on one example batch."""

    model: Any
    args: tuple
    kwargs: dict
    batch_size: int
    batch_dim: object
    strict: bool = True
    runs: Dict[str, Any] = field(default_factory=dict)
    entries: List[Entry] = field(default_factory=list)
    output_layouts: List[Any] = field(default_factory=list)
    problems: List[PrivacyError] = field(default_factory=list)
    log: List[str] = field(default_factory=list)

    def problem(self, exc: PrivacyError):
        """Raise in strict mode (privatize), collect otherwise (explain)."""
        if self.strict:
            raise exc
        if not any(str(p) == str(exc) for p in self.problems):
            self.problems.append(exc)


class PassError(RuntimeError):
    pass


def run_pipeline(analysis: Analysis, passes: Sequence[Callable[[Analysis], PassResult]],
                 dump: Optional[Callable[[str, int, Analysis], None]] = None) -> Analysis:
    """Run ``passes`` in order; privacy errors keep their type, with the pass named."""
    if dump is not None:
        dump("input", 0, analysis)
    for i, p in enumerate(passes, 1):
        name = getattr(p, "__name__", repr(p))
        before = {id(e): e.snapshot() for e in analysis.entries}
        try:
            result = p(analysis)
        except PrivacyError as exc:
            if not str(exc).startswith("[pass "):
                exc.args = (f"[pass {name}] {exc.args[0] if exc.args else ''}",) + tuple(exc.args[1:])
            raise
        except Exception as exc:
            raise PassError(f"fxdp: analysis pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
        analysis = result.analysis
        for e in analysis.entries:
            if id(e) not in before:
                e.made_by = e.made_by or name
            elif before[id(e)] != e.snapshot():
                e.changed_by.append(name)
        analysis.log.append(f"{name}: {'modified' if result.modified else 'unchanged'}")
        if dump is not None:
            dump(name, i, analysis)
    return analysis
