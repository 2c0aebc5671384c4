"""What the engine has clipped since its private gradients were last cleared, and whether a
backward pass accumulates into parameters at all.

Two small records that tie ``p.private_grad`` to the examples behind it:

- :class:`StepLedger` -- every finalized backward pass adds its forward's batch size (the number
  of rows the engine clipped as samples). The optimizer compares it, at each step, with the number
  of examples its data loader drew for the logical batch (:mod:`fxdp.training.step_check`); it is
  reset whenever the private gradients are cleared (optimizer step, ``zero_grad``,
  ``fxdp.clear_private_grads``).
- :class:`BackwardTargets` -- whether the running backward pass would accumulate a gradient into
  (or capture the gradient of) a trainable parameter. ``torch.autograd.grad(loss, x_adv)`` (PGD /
  FGSM adversarial examples, input-gradient penalties) and ``loss.backward(inputs=[x])`` do not:
  such a pass must contribute nothing to ``private_grad``; ``loss.backward(inputs=[some parameters])``
  trains those parameters only (the per-sample gradient with respect to them is clipped; the others
  get zeros). It asks autograd's engine whether it will execute each parameter's ``AccumulateGrad``
  node; those nodes are looked up once, in grad mode during a forward pass, and held, so that
  autograd keeps using the same node objects.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import torch

from fxdp.core.errors import PrivacyError


class StepLedger:
    """Rows clipped as samples since the last reset, one entry per finalized backward pass."""

    def __init__(self):
        self.batch_sizes: List[int] = []
        # names of the used parameters the passes since the last reset did not train (backward(inputs=[...]))
        self.untrained: Optional[FrozenSet[str]] = None

    @property
    def samples(self) -> int:
        return sum(self.batch_sizes)

    @property
    def passes(self) -> int:
        return len(self.batch_sizes)

    def record(self, batch_size: int) -> None:
        self.batch_sizes.append(int(batch_size))

    def reset(self) -> None:
        self.batch_sizes = []
        self.untrained = None

    def admit(self, untrained: FrozenSet[str]) -> None:
        """Before a pass is finalized: every pass of one step must train the same parameters. Micro-batches that
        each call ``backward(inputs=[...])`` with another subset clip an example over the subset of the
        micro-batch it falls in, which depends on the other examples (removing one shifts the rest): 7 R was
        measured with alternating subsets. ``untrained`` names the parameters this pass used but did not train."""
        if self.batch_sizes and untrained != self.untrained:
            before, now = sorted(self.untrained or ()), sorted(untrained)
            raise PrivacyError(
                "fxdp: the backward passes of one step train different parameters (backward(inputs=[...]) with "
                f"another subset: earlier passes left {before[:4] or 'none'} untrained, this one {now[:4] or 'none'}). "
                "Each example would be clipped over the parameters of the micro-batch it falls in, which depends on "
                "the other examples, so one example could move the step by more than R. Use the same inputs= in "
                "every backward pass of a step (or step the optimizer between them).")
        self.untrained = untrained


class PassTraining:
    """What the running backward pass trains: the names it accumulates into, and the names of parameters
    whose uses it reached but does not train (``backward(inputs=[...])`` naming others)."""

    def __init__(self):
        self.trained: Set[str] = set()
        self.reached: Set[str] = set()

    def add(self, targets: Iterable[Tuple[str, torch.Tensor]], trained: Set[str]) -> None:
        self.trained |= trained
        self.reached |= {n for n, _ in targets}

    @property
    def untrained(self) -> FrozenSet[str]:
        return frozenset(self.reached - self.trained)


class BackwardTargets:
    """The ``AccumulateGrad`` nodes of trainable parameters, and the question asked in backward."""

    def __init__(self):
        self._nodes: Dict[int, object] = {}

    def prepare(self, model: torch.nn.Module, trainable: Dict[int, str]) -> None:
        """Forward pass, grad mode: hold the gradient accumulator of each trainable parameter (ids as
        keys: a held node keeps its parameter alive, so an id cannot be reused while cached)."""
        if self._nodes.keys() == trainable.keys():
            return
        nodes = {}
        for p in model.parameters():
            if id(p) in trainable:
                nodes[id(p)] = self._nodes.get(id(p)) or torch.autograd.graph.get_gradient_edge(p).node
        self._nodes = nodes

    def trained(self, targets: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """In backward: the names among ``targets`` (:func:`use_targets`) whose tensor this pass accumulates into
        (or captures the gradient of: refused). ``loss.backward(inputs=[some parameters])`` trains those only;
        the engine keeps the factors of these names and drops the others'."""
        return {name for name, p in targets if self._accumulates(p)}

    def accumulates(self, targets: Iterable[Tuple[str, torch.Tensor]]) -> bool:
        """In backward: True if this pass accumulates into (or captures the gradient of) any of ``targets``."""
        return any(self._accumulates(p) for _, p in targets)

    def _accumulates(self, p) -> bool:
        """Unknown tensors count as accumulating (the pass is then clipped and counted)."""
        node = self._nodes.get(id(p))
        if node is None and isinstance(p, torch.Tensor) and p.requires_grad:
            # a virtual parameter whose sources are unknown answers through its own node: a fresh leaf's
            # accumulator, or its link to its sources (fxdp.engine.tap.VirtualLink); counting it as accumulating
            # made an input-gradient pass a training pass (doubled PGD's sums: 2 R)
            node = torch.autograd.graph.get_gradient_edge(p).node
        if node is None:
            return True
        try:
            return bool(torch._C._will_engine_execute_node(node))
        except RuntimeError:
            # torch.autograd.grad(loss, [parameters]): the leaf is captured, not accumulated
            raise PrivacyError(
                "fxdp: torch.autograd.grad(loss, parameters) on a privatized model is not supported: fxdp "
                "forms the clipped per-sample sum in backward() and writes it to p.private_grad (the optimizer "
                "noises it), and never returns parameter gradients, which would be unclipped and un-noised. "
                "Call loss.backward() and read p.private_grad (or step the DPOptimizer); torch.autograd.grad "
                "with respect to inputs (adversarial examples) is fine.") from None


def use_targets(use) -> List[Tuple[str, torch.Tensor]]:
    """(parameter name, tensor) pairs whose accumulators tell whether, and into which parameters, a backward
    pass trains through ``use``: its parameters, except that a virtual parameter stands for the parameters it
    was made from (``ForwardContext.params``). Eager ones are linked to them (:class:`fxdp.engine.tap.VirtualLink`),
    compiled ones are detached values with no accumulator of their own (:mod:`fxdp.compile.virtual_taps`), the
    sources being inputs of the compiled graph; counting a virtual parameter itself as accumulating made a PGD
    input-gradient pass a training pass (2 R), and a fresh leaf's own accumulator was in no
    ``backward(inputs=[parameters])`` (its uses were dropped). A source not found answers through the virtual
    parameter's own node (see :meth:`BackwardTargets._accumulates`)."""
    ctx = use.context
    made = {v.name: v for v in ctx.virtuals}
    out = []
    for role, p in use.binding.params.items():
        name = use.binding.roles.get(role)
        if name not in made:
            out.append((name, p))
            continue
        pending = [name]
        while pending:
            n = pending.pop()
            if n in made:
                pending.extend(made[n].inputs)
            elif isinstance(ctx.params.get(n), torch.Tensor):
                out.append((n, ctx.params[n]))
            else:
                out.append((n, p))
    return out
