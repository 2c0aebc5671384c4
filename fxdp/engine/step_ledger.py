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
  such a pass must contribute nothing to ``private_grad``. It asks autograd's engine whether it will
  execute each parameter's ``AccumulateGrad`` node; those nodes are looked up once, in grad mode
  during a forward pass, and held, so that autograd keeps using the same node objects.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch

from fxdp.core.errors import PrivacyError


class StepLedger:
    """Rows clipped as samples since the last reset, one entry per finalized backward pass."""

    def __init__(self):
        self.batch_sizes: List[int] = []

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

    def accumulates(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """In backward: True if this pass accumulates into (or captures the gradient of) any of
        ``params``. Unknown parameters count as accumulating (the pass is then clipped and counted)."""
        for p in params:
            node = self._nodes.get(id(p))
            if node is None and isinstance(p, torch.Tensor) and p.is_leaf and p.requires_grad:
                # a virtual parameter (made from trainable ones before it meets the batch: weight_norm, W + A @ B) is a
                # fresh leaf the tap takes as an input: its accumulator is in the graph, and a pass that goes on to
                # the parameters executes it (counted as accumulating, an input-gradient pass doubled PGD's sums: 2 R)
                node = torch.autograd.graph.get_gradient_edge(p).node
            if node is None:
                return True
            try:
                if torch._C._will_engine_execute_node(node):
                    return True
            except RuntimeError:
                # torch.autograd.grad(loss, [parameters]): the leaf is captured, not accumulated
                raise PrivacyError(
                    "fxdp: torch.autograd.grad(loss, parameters) on a privatized model is not supported: fxdp "
                    "forms the clipped per-sample sum in backward() and writes it to p.private_grad (the optimizer "
                    "noises it), and never returns parameter gradients, which would be unclipped and un-noised. "
                    "Call loss.backward() and read p.private_grad (or step the DPOptimizer); torch.autograd.grad "
                    "with respect to inputs (adversarial examples) is fine.") from None
        return False


def use_targets(use) -> list:
    """The tensors whose accumulators tell whether a backward pass trains through ``use``: its parameters,
    except that a virtual parameter a compiled region recorded (a detached value, no accumulator of its own:
    :mod:`fxdp.compile.virtual_taps`) stands for the parameters it was made from, which are inputs of the
    compiled graph (counting it as accumulating made a PGD input-gradient pass a training pass: 2 R). An
    eager virtual parameter is a fresh leaf the tap takes as an input and answers for itself."""
    ctx = use.context
    made = {v.name: v for v in ctx.virtuals} if ctx.compiled and ctx.virtuals else {}
    out = []
    for role, p in use.binding.params.items():
        name = use.binding.roles.get(role)
        if name not in made or (p.is_leaf and p.requires_grad):
            out.append(p)
            continue
        pending = [name]
        while pending:
            n = pending.pop()
            if n in made:
                pending.extend(made[n].inputs)
            elif isinstance(ctx.params.get(n), torch.nn.Parameter):
                out.append(ctx.params[n])
            else:
                out.append(p)  # unknown: counts as accumulating
    return out
