"""What a per-sample rule is, and what it is given.

A *rule* covers one family of operations that use trainable parameters
(linear, conv, embedding, norms, broadcast elementwise). For one intercepted
call it produces a :class:`Binding`: which parameter plays which role, which
input tensors must be kept for the norms (``saved``), and which tensor tells
where the samples are (``layout_source``). After backward the rule turns the
saved tensors and the output gradient into per-sample gradient factors
(:mod:`fxdp.rules.factors`). The same rule code serves every path that feeds
the engine; the engine never branches on where a use came from.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from fxdp.core.errors import PrivacyError


def func_name(func) -> str:
    """Readable name of a torch function or Tensor method ("F.linear", "torch.addmm", "Tensor.expand")."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", "") or ""
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    if mod.startswith("torch.nn.functional") or mod.startswith("torch._C._nn"):
        return "F." + name
    if name.startswith("_TensorBase.") or name.startswith("TensorBase."):
        name = "Tensor." + name.split(".", 1)[1]
    if mod == "torch" or (mod.startswith("torch") and "." not in name and not name.startswith("Tensor")):
        return "torch." + name
    return name


@dataclass
class OpCall:
    """One intercepted call of a torch function that touches trainable parameters."""

    func: Callable
    args: tuple
    kwargs: dict
    trainable: Dict[int, str]  # id(tensor) -> parameter name, for the trainable params among the arguments

    def arg(self, pos: int, name: str, default: Any = None) -> Any:
        if pos < len(self.args):
            return self.args[pos]
        return self.kwargs.get(name, default)

    def param_name(self, t: Any) -> Optional[str]:
        return self.trainable.get(id(t)) if isinstance(t, torch.Tensor) else None

    @property
    def name(self) -> str:
        return func_name(self.func)


def root_names(name: str) -> List[str]:
    """The parameters a (virtual) parameter name stands for (see :mod:`fxdp.rules.virtual`)."""
    return name.split("~", 1)[0].split("+") if "~v" in name else [name]


def root_names_of(names: Iterable[str]) -> Tuple[str, ...]:
    """The parameters behind several (virtual) parameter names, sorted once each (for error reports)."""
    return tuple(sorted({r for n in names for r in root_names(n)}))


def trainable_roles(call: "OpCall", pairs):
    """(roles, params) for the (role, tensor) pairs whose tensor is a trainable parameter."""
    roles, params = {}, {}
    for role, t in pairs:
        n = call.param_name(t)
        if n:
            roles[role], params[role] = n, t
    return roles, params


@dataclass
class Binding:
    """How a rule reads one call.

    Attributes:
        rule: the rule that bound the call.
        roles: role ("weight", "bias", ...) -> parameter name.
        params: role -> the parameter tensor used at the call.
        saved: name -> tensor the rule needs after backward (kept detached).
        layout_source: the tensor whose leading dimensions are shared with the
            call's output (and output gradient) and tell where the samples are;
            None means the call's output itself.
        broadcast: role -> shape the parameter is broadcast to inside the call;
            the engine captures the gradient of that broadcast tensor.
        grad_of_output: role -> True when the role's per-sample gradient is the
            output gradient itself (a parameter expanded over the batch).
        options: rule-specific constants (eps, stride, ...).
        liftable: the layout source may be expanded over the batch when it has
            no batch dimension (position ids of shape (1, T)).
    """

    rule: "Rule"
    roles: Dict[str, str]
    params: Dict[str, torch.Tensor]
    saved: Dict[str, torch.Tensor] = field(default_factory=dict)
    layout_source: Optional[torch.Tensor] = None
    broadcast: Dict[str, torch.Size] = field(default_factory=dict)
    grad_of_output: Dict[str, bool] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)
    liftable: bool = False

    @property
    def param_names(self) -> tuple:
        return tuple(sorted(self.roles.values()))


class Rule(abc.ABC):
    """Base class of per-layer-family rules (see module docstring)."""

    #: short name shown in reports
    name: str = "rule"
    #: torch functions / Tensor methods this rule binds
    funcs: Sequence[Callable] = ()

    @abc.abstractmethod
    def bind(self, call: OpCall) -> Optional[Binding]:
        """Return a Binding, None if this rule does not apply, or raise a PrivacyError."""

    @abc.abstractmethod
    def factors(self, binding: Binding, saved: Dict[str, torch.Tensor], grad_output: torch.Tensor,
                extra_grads: Dict[str, torch.Tensor], layout, batch_size: int) -> Dict[str, Any]:
        """Per-sample gradient factors per role, from the (raw-layout) saved tensors."""

    def decompose(self, call: OpCall) -> Optional[Callable[[], Any]]:
        """For composite ops (e.g. multi-head attention): a callable that runs the
        op as simpler torch calls, which are intercepted in turn. None otherwise."""
        return None

    def shape_summary(self, binding: Binding) -> Dict[str, int]:
        """Sizes (T, m, n, ...) used by reports and the cost model; rule-specific."""
        return {}


class NoFactorsRule(Rule):
    """A rule that never binds a call for per-sample factors: it only refuses (``bind`` raises) or
    decomposes the call into covered ops (``decompose``). ``factors`` is unreachable by construction."""

    def factors(self, binding, saved, grad_output, extra_grads, layout, batch_size):
        raise PrivacyError(f"fxdp: internal error: the {self.name} rule produced a binding, but it only refuses or "
                           "decomposes calls; please report this.")
