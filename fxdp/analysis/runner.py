"""The pass runner: one loop for the analysis passes and the compile layer's region passes.

A pass is a small named function ``subject -> PassResult(subject, modified)`` (torch.fx's pass
infrastructure is the model). :func:`run_passes` runs passes in order, calls ``after_pass`` (the
compile layer lints and recompiles a modified graph there) and ``dump`` after each one, and names the
failing pass in any error: a :class:`~fxdp.core.errors.PrivacyError` keeps its type with
``[pass NAME]`` prefixed, anything else becomes a :class:`PassError`. Dumps (FXDP_DEBUG) are the
runner's: :mod:`fxdp.analysis.dumps`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from fxdp.core.errors import PrivacyError


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) subject, and whether the pass changed it."""

    subject: Any
    modified: bool


class PassError(RuntimeError):
    """A pass failed with an error that is not a refusal (a bug, or an unexpected model)."""


def run_passes(subject, passes: Sequence[Callable[[Any], PassResult]], *, label: str = "analysis",
               after_pass: Optional[Callable[[str, PassResult], None]] = None,
               dump: Optional[Callable[[str, int, Any], None]] = None):
    """Run ``passes`` over ``subject`` in order and return the final subject (see module docstring)."""
    if dump is not None:
        dump("input", 0, subject)
    for i, p in enumerate(passes, 1):
        name = getattr(p, "__name__", repr(p))
        try:
            result = p(subject)
        except PrivacyError as exc:
            if not str(exc).startswith("[pass "):
                exc.args = (f"[pass {name}] {exc.args[0] if exc.args else ''}",) + tuple(exc.args[1:])
            raise
        except Exception as exc:
            raise PassError(f"fxdp: {label} pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
        subject = result.subject
        if after_pass is not None:
            after_pass(name, result)
        if dump is not None:
            dump(name, i, subject)
    return subject


def run_pipeline(analysis, passes, dump: Optional[Callable[[str, int, Any], None]] = None):
    """Run the analysis passes; every :class:`~fxdp.analysis.state.Entry` learns the pass that made it
    and the passes that changed it, and the analysis keeps a log line per pass."""
    before = {}

    def snapshot(_name=None, _index=None, subject=None):
        before.clear()
        before.update({id(e): e.snapshot() for e in subject.entries})

    def track(name: str, result: PassResult):
        for e in result.subject.entries:
            if id(e) not in before:
                e.made_by = e.made_by or name
            elif before[id(e)] != e.snapshot():
                e.changed_by.append(name)
        result.subject.log.append(f"{name}: {'modified' if result.modified else 'unchanged'}")

    def after_each(name, index, subject):
        if dump is not None:
            dump(name, index, subject)
        snapshot(subject=subject)

    return run_passes(analysis, passes, label="analysis", after_pass=track, dump=after_each)
