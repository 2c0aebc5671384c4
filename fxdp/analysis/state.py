"""What the analysis knows about a model on one example batch: :class:`Analysis` and its :class:`Entry` records.

The analysis passes (:mod:`fxdp.analysis`) each take and return an :class:`Analysis`; they are run by
:func:`fxdp.analysis.runner.run_pipeline`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from fxdp.core.errors import PrivacyError


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
    virtual: bool = False  # batch-free: its result is a virtual parameter (fxdp.rules.virtual)

    def snapshot(self) -> tuple:
        return (self.layout, self.lift, self.reason, self.source_shape, self.output_shape, self.virtual)


@dataclass(eq=False)
class Analysis:
    """What the analysis knows about a model on one example batch."""

    model: Any
    args: tuple
    kwargs: dict
    batch_size: int
    batch_dim: object
    strict: bool = True
    probe_size: int = 3  # samples per probe run (re-validation of an unseen call sequence: the whole batch)
    runs: Dict[str, Any] = field(default_factory=dict)
    entries: List[Entry] = field(default_factory=list)
    output_layouts: List[Any] = field(default_factory=list)
    problems: List[PrivacyError] = field(default_factory=list)
    log: List[str] = field(default_factory=list)
    forward_runs: int = 0  # analysis runs of the user's forward
    not_virtual: set = field(default_factory=set)  # batch-free call sites left to the family rules (capture)

    def problem(self, exc: PrivacyError):
        """Raise in strict mode (privatize), collect otherwise (explain)."""
        if self.strict:
            raise exc
        if not any(str(p) == str(exc) for p in self.problems):
            self.problems.append(exc)


