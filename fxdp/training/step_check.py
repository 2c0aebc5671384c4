"""The step invariants: what one optimizer step releases is exactly what was sampled and charged.

Every backward pass adds a clipped sum into ``p.private_grad``; nothing in autograd ties those sums
to the examples the data loader drew. These checks do, at every real ``DPOptimizer.step()``:

- **Ownership** (:func:`check_owned`, always): every trainable parameter of a privatized model whose
  private gradient is about to be released must be a parameter of this optimizer. A trainable
  parameter no optimizer owns would accumulate clipped but un-noised sums across steps (and release
  them all at once when it is later added with ``add_param_group``). Freeze it
  (``p.requires_grad_(False)``) or give it to the optimizer. After every step and every
  ``zero_grad()`` the private gradients of *all* parameters of the engines involved are cleared
  (:func:`clear_engines`), with their ledgers.
- **Drawn = clipped** (:class:`DrawnBatchCheck`, where fxdp owns the data loader:
  ``PrivacyEngine.make_private*``, ``BatchMemoryManager``, ``DPDistributed``, fastDP ``attach`` with a
  loader): the rows the engines clipped as samples since the private gradients were last cleared
  (:class:`fxdp.engine.step_ledger.StepLedger`) must equal the examples the loader handed out for this
  logical batch, and at least one batch must have been handed out. This refuses, among others:
  several views / augmentations of one batch each with its own backward pass (each example would
  count k·R), a validation batch's backward pass left in the private gradients, tokens flattened to
  ``(B·T, d)`` before the model (B·T "samples" for B examples), a ``batch_first`` / ``batch_dim`` that
  does not match the data, and a step on batches of another loader (e.g. the original one, which the
  accountant does not charge for). Only counts are compared, not identities: between the loader and
  the model inputs are legitimately transformed (device moves, augmentation), so a batch of another
  source with exactly the drawn size is not detected.
"""
from __future__ import annotations

import math

from typing import Dict, Iterable, List

from fxdp.core.errors import PrivacyError
from fxdp.engine.install import engine_of


def engines_of(params: Iterable) -> List[object]:
    """The engines that wrote the private gradients of ``params`` (one entry per engine)."""
    engines: Dict[int, object] = {}
    for p in params:
        if getattr(p, "private_grad", None) is None:
            continue
        engine = engine_of(p)
        if engine is not None:
            engines[id(engine)] = engine
    return list(engines.values())


def unowned_trainable(module, params: Iterable) -> List[str]:
    """Names of ``module``'s trainable parameters that are not among ``params``."""
    owned = {id(p) for p in params}
    return [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owned]


def ownership_message(names: List[str], when: str) -> str:
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return (f"fxdp: {len(names)} trainable parameter(s) of the privatized model are not in the optimizer {when}: "
            f"{shown}. Their clipped gradients would never be noised (and, added later with add_param_group, "
            "the sums of many steps would be released at once). Give every trainable parameter to the optimizer, "
            "or freeze the others with p.requires_grad_(False).")


def check_one_poisson_batch(n: int) -> None:
    """At most one Poisson batch per optimizer step (``n``: the batches drawn since the last step)."""
    if n > 1:
        raise PrivacyError(
            f"fxdp: {n} Poisson batches were drawn from the private data loader for one optimizer step. "
            "Accumulating gradients across Poisson batches lets an example drawn twice contribute 2R and "
            "breaks the accountant's sampling rate; step once per batch, and use fxdp.BatchMemoryManager to "
            "split a large logical batch into micro-batches. (Skipping a batch, e.g. an empty one, is refused "
            "for the same reason: an empty Poisson batch must still step.)")


def check_owned(params: List, engines: List[object]) -> None:
    """Refuse a step while a trainable parameter of an involved engine's model is not in ``params``."""
    for engine in engines:
        names = unowned_trainable(engine.model, params)
        if names:
            raise PrivacyError(ownership_message(names, "that steps"))


def check_one_engine(engines: List[object]) -> None:
    """One step releases the private gradients of one privatized model: two models each clip a sample
    to R on their own, so one example that went through both moves the step by up to √2·R (N models:
    √N·R) while σ is calibrated to R."""
    if len(engines) > 1:
        raise PrivacyError(
            f"fxdp: this step would release private gradients written by {len(engines)} separately privatized "
            "models; each clips an example's gradient to R on its own, so an example used by all of them "
            f"contributes up to √{len(engines)}·R while the noise is calibrated to R. Privatize one module that "
            "holds them all (e.g. an nn.ModuleDict, with a forward that calls each) so that one engine clips each "
            "example's joint gradient, or give each model its own optimizer and accountant.")


def check_plausible_count(engines: List[object], expected_batch_size: float) -> None:
    """Where no fxdp loader says what was drawn (``privatize`` + ``DPOptimizer`` by hand), a step whose
    clipped samples far exceed what a Poisson batch of the expected size can hold is refused: a backward
    left in the private gradients (``model.zero_grad()`` does not clear ``p.private_grad``), or views
    clipped separately. The bound L + 8√L + 8 is exceeded by a Poisson(L) draw with probability < 1e-12."""
    clipped = sum(b for engine in engines for b in engine.ledger.batch_sizes)
    L = float(expected_batch_size)
    if L > 0 and clipped > L + 8 * math.sqrt(L) + 8:
        raise PrivacyError(
            f"fxdp: this step would release the clipped gradients of {clipped} samples, far more than a batch of "
            f"the expected size {L:g} holds. A backward pass whose private gradients should have been discarded "
            "is probably still in them (adversarial examples computed with loss.backward(), a validation batch): "
            "note that model.zero_grad() does not clear p.private_grad -- call optimizer.zero_grad() (the "
            "DPOptimizer's) or fxdp.clear_private_grads(model), or compute input gradients with "
            "torch.autograd.grad(loss, x). Several views of one example belong in one fxdp.privacy_units block.")


def refuse_unowned(module, optimizer) -> None:
    """Setup-time form of :func:`check_owned` (``make_private``, ``attach``)."""
    names = unowned_trainable(module, [p for g in optimizer.param_groups for p in g["params"]])
    if names:
        raise PrivacyError(ownership_message(names, "given to make_private"))


def clear_engines(engines: List[object]) -> None:
    """Drop the private gradients of every parameter of the engines' models, their ledgers and the
    record of the R their backward passes clipped with (it lives and dies with the private gradients)."""
    for engine in engines:
        for p in engine.model.parameters():
            if hasattr(p, "private_grad"):
                del p.private_grad
        engine.ledger.reset()
        engine.clip_bound.clear_pending()


class DrawnBatchCheck:
    """Drawn = clipped, for an optimizer whose data loader fxdp owns (module docstring).

    ``drew(n)`` is called by the loader when it hands out a batch of ``n`` examples (the rows of a
    data-independent stand-in for an empty batch count as drawn); :meth:`verify` runs in the step's
    checks; :meth:`reset` after each real step.
    """

    def __init__(self, source: str = "the data loader fxdp returned"):
        self.source = source
        self.examples = 0
        self.batches = 0

    def drew(self, n: int) -> None:
        self.examples += int(n)
        self.batches += 1

    def reset(self) -> None:
        self.examples = 0
        self.batches = 0

    def new_pass(self) -> None:
        """A fixed-size loader starts a new pass: batches handed out by the last pass and never
        stepped on (a loop that broke out of its epoch) are forgotten. This only lowers the drawn
        count, so whatever they contributed to the private gradients is still refused."""
        self.reset()

    def verify(self, engines: List[object]) -> None:
        if self.batches == 0:
            raise PrivacyError(
                f"fxdp: step() without a batch drawn from {self.source} since the last step. The accountant "
                "charges for the sampling of that loader only: batches from another loader (such as the original "
                "one passed to make_private) are neither Poisson-sampled nor charged. Iterate the loader that "
                "make_private returned.")
        sizes = [b for engine in engines for b in engine.ledger.batch_sizes]
        clipped, drawn = sum(sizes), self.examples
        if clipped == drawn:
            return
        raise PrivacyError(
            f"fxdp: this step would release the clipped gradients of {clipped} samples ({len(sizes)} backward "
            f"pass(es) of batch size {', '.join(map(str, sizes)) or '-'} since the private gradients were last "
            f"cleared), but {drawn} examples were drawn for this logical batch from {self.source}. "
            + _diagnosis(sizes, drawn))


def _diagnosis(sizes: List[int], drawn: int) -> str:
    clipped = sum(sizes)
    if drawn > 0 and clipped > drawn and clipped % drawn == 0:
        k = clipped // drawn
        if len(sizes) == 1:
            return (f"The model's batch dimension holds {k} rows per example: were tokens or views flattened into "
                    "the batch dimension (e.g. (B·T, d)) before the model, or does batch_first / batch_dim not "
                    "match the data? One example would be clipped as several samples, each up to R. Keep one row "
                    "per example in the batch dimension.")
        return (f"Each example went through {k} backward passes (several views or augmentations of one batch, each "
                "with its own forward and backward; or a backward pass on other data, such as a validation batch, "
                f"left in the private gradients): one example would contribute up to {k}·R. Run the views in one "
                "forward pass and clip each example's summed gradient once (declare the rows of one example as "
                "one privacy unit), call optimizer.zero_grad() after backward passes that must not be released, "
                "or step after each backward pass.")
    if clipped > drawn:
        return ("A backward pass on other data (a validation or test batch, a batch of another loader) is still "
                "in the private gradients, or the batch dimension does not match the data (batch_first / "
                "batch_dim). Call optimizer.zero_grad() after backward passes that must not be released (or run "
                "them under torch.no_grad()), and keep one row per example in the batch dimension.")
    return ("Some drawn examples were not clipped (no backward pass, a backward pass on part of the batch, or a "
            "batch_first / batch_dim that does not match the data). Run one forward and backward pass over the "
            "whole batch the loader handed out.")


def bind_loader_check(optimizer, loader, source: str = "the data loader fxdp returned") -> DrawnBatchCheck:
    """Make ``loader`` (one of fxdp's loaders) report its batches to ``optimizer``, which then checks
    drawn = clipped at every step."""
    check = DrawnBatchCheck(source)
    optimizer.batch_check = check
    loader.dp_optimizer = optimizer
    return check


__all__ = ["DrawnBatchCheck", "bind_loader_check", "check_owned", "clear_engines", "engines_of", "refuse_unowned"]
