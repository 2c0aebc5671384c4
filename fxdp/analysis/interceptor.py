"""Interception of every torch call made during a privatized forward pass.

:class:`ParameterInterceptor` is a ``TorchFunctionMode``: it sees each torch
function / Tensor method called while the model's forward runs, with its real
arguments. A call that touches a trainable parameter is handed to the rule
registry; the bound call is passed to a *recorder* (the runtime taps or the
layout analysis). A call no rule covers may still run when its result carries
no gradient (metadata reads, ``detach``, comparisons); otherwise it is refused
with an error naming the parameter and the op -- a parameter is never trained
without clipping and never silently skipped.

Two optional recorder hooks: ``observe(func, args, kwargs, out)`` sees every call
(the analysis follows which tensors depend on the samples), and
``virtual(call, interceptor)`` may turn a call that uses parameters only through
batch-free ops (``W.t()``, ``table[index]``, ``scale.exp()``) into a *virtual
parameter* (:mod:`fxdp.rules.virtual`): a fresh leaf the interceptor then treats
like a trainable parameter (``param_names``) at the ops where it meets the batch.

Activation checkpointing (:mod:`fxdp.analysis.checkpointing`): inside the forward of a non-reentrant
``torch.utils.checkpoint`` region calls are handled as usual, but only a recorder that replays the
recomputation (``recorder.replays_checkpoints``, the engine's) may tap them; any other refuses. In the
no-grad forward of a reentrant region a parameter use is bound as in grad mode and handed to the
recorder inside ``recorder.reentrant(region)`` (the engine reserves its tap for the re-run in backward);
its result is detached, as the no-grad forward would have made it.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from fxdp.core.errors import SampleMixingError, UncoveredParameterError
from fxdp.rules import OpCall, bind, decomposition, func_name
from fxdp.rules.functional import PerSampleFallbackRule
from fxdp.rules.base import root_names_of as _roots
from fxdp.analysis.checkpointing import in_checkpoint, reentrant_checkpoint
from fxdp.analysis.drawn_dropout import dropout_decomposition
from fxdp.analysis.masked_assign import masked_assignment
from fxdp.analysis.batch_free_writes import refuse_batch_free_write, versions

FALLBACK = PerSampleFallbackRule()
# calls with parameters that no rule takes as they are, spelled as covered torch calls (before any rule)
RESPELLINGS = (dropout_decomposition, masked_assignment)


BATCH_MIXING = {
    F.batch_norm: "BatchNorm in training mode normalises with statistics of the whole batch",
    torch.batch_norm: "BatchNorm in training mode normalises with statistics of the whole batch",
}

SUGGEST = "Replace BatchNorm with GroupNorm or LayerNorm (fxdp.fix_batchnorm(model) does it for you)."

# dropout -> whether it is active when ``training`` / ``train`` is not given
DROPOUT_TRAINING_DEFAULT = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
                            F.alpha_dropout: False, F.feature_alpha_dropout: False, torch.dropout: True}


def dropout_on_parameter(func, args, kwargs, names):
    """Dropout applied to a (virtual) parameter itself (DeBERTa's ``pos_dropout(rel_embeddings)``): when inactive
    (p = 0 or not training) the identity, its input returned as is (as the analysis runs see every dropout);
    else the refusal to raise (one mask shared by all samples, which per-sample gradients cannot replay).
    Returns (input, None) or (None, refusal)."""
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train",
                                                                             DROPOUT_TRAINING_DEFAULT[func]))
    if not training or float(p) == 0.0:
        return x, None
    exc = UncoveredParameterError(
        f"fxdp: {func_name(func)} with p={p} applied to {', '.join(_roots(names))} directly, before it meets the "
        "batch: its mask is drawn once for the whole batch, and fxdp's per-sample gradients of a tensor computed "
        "from parameters alone cannot replay it. Set that dropout's p to 0 (or apply it after the op that meets "
        "the batch), or freeze the parameter.")
    exc.param_names = _roots(names)
    return None, exc


def checkpoint_refusal(names, func, reentrant: bool, why: str = "") -> UncoveredParameterError:
    """Refusal of a parameter use inside a ``torch.utils.checkpoint`` region this recorder cannot replay."""
    names = _roots(names)
    kind = "reentrant" if reentrant else "non-reentrant"
    why = why or ("this pass of fxdp cannot replay the recomputation that backward runs, so the parameters' "
                  "gradients would not be clipped per sample")
    exc = UncoveredParameterError(
        f"fxdp: {', '.join(names)} used by {func_name(func)} inside a {kind} torch.utils.checkpoint region "
        f"(activation / gradient checkpointing): {why}. Disable checkpointing for this module (HuggingFace: "
        "model.gradient_checkpointing_disable()) and reduce the batch size with fxdp.BatchMemoryManager "
        "(micro-batches, noise once per logical batch) instead.")
    exc.param_names = names
    return exc


class ParameterInterceptor(TorchFunctionMode):
    """Routes calls that use trainable parameters to ``recorder.handle``.

    ``param_names`` maps ``id(parameter)`` to its name, for trainable
    parameters only. The recorder decides what happens to a bound call.
    """

    def __init__(self, param_names: Dict[int, str], recorder):
        super().__init__()
        self.param_names = param_names
        self.recorder = recorder
        self.virtual_leaves = []  # keeps virtual parameters alive while their ids are in param_names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._call(func, args, kwargs)
        observe = getattr(self.recorder, "observe", None)
        if observe is not None:
            observe(func, args, kwargs, out)
        return out

    def _call(self, func, args, kwargs):
        for respell in RESPELLINGS:  # before the recorder's substitutes: the analysis sees the same call sites
            run = respell(func, args, kwargs, self.param_names)
            if run is not None:
                with self:
                    return run()
        substitute = self.recorder.substitute(func, args, kwargs)
        if substitute is not None:
            return substitute()
        if not torch.is_grad_enabled():
            leaves, _ = tree_flatten((args, kwargs))
            names = [self.param_names[id(t)] for t in leaves if isinstance(t, torch.Tensor) and id(t) in self.param_names]
            region = reentrant_checkpoint() if names else None
            if region is not None:
                return self._reentrant_call(region, names, func, args, kwargs)
            return func(*args, **kwargs)
        if func in BATCH_MIXING:
            self._refuse_batch_mixing(func, args, kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        trainable = {id(t): self.param_names[id(t)] for t in leaves
                     if isinstance(t, torch.Tensor) and id(t) in self.param_names}
        if not trainable:
            return func(*args, **kwargs)
        if func in DROPOUT_TRAINING_DEFAULT:
            same, exc = dropout_on_parameter(func, args, kwargs, trainable.values())
            return same if exc is None else self.recorder.refuse(exc, func, args, kwargs)
        if in_checkpoint() and not getattr(self.recorder, "replays_checkpoints", False):
            return self.recorder.refuse(checkpoint_refusal(trainable.values(), func, reentrant=False), func, args, kwargs)
        call = OpCall(func, tuple(args), dict(kwargs), trainable)
        decomposed = decomposition(call)
        if decomposed is not None:
            with self:
                return decomposed()
        virtual = getattr(self.recorder, "virtual", None)
        if virtual is not None:
            before = versions(leaves)
            made = virtual(call, self)
            if made is not None:  # a batch-free call: its in-place writes would lose the gradient
                return refuse_batch_free_write(self.recorder, func, args, kwargs, trainable, before, made)
        try:
            binding = bind(call)
        except (UncoveredParameterError, SampleMixingError) as exc:
            exc.param_names = _roots(trainable.values())
            return self.recorder.refuse(exc, func, args, kwargs)
        if binding is not None:
            unbound = set(trainable) - {id(p) for p in binding.params.values()}
            if unbound:
                names = ", ".join(sorted({trainable[i] for i in unbound}))
                exc = UncoveredParameterError(
                    f"fxdp: trainable parameter(s) {names} enter {func_name(func)} in a position the "
                    f"{binding.rule.name} rule does not cover (e.g. as its input); their gradient would "
                    "bypass clipping. Freeze them or use them through a supported layer.")
                exc.param_names = _roots(trainable[i] for i in unbound)
                return self.recorder.refuse(exc, func, args, kwargs)
            return self.recorder.handle(call, binding)
        out = func(*args, **kwargs)
        out_leaves, _ = tree_flatten(out)
        if isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point() \
                and func not in BATCH_MIXING:
            return self.recorder.handle(call, FALLBACK.bind(call))
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in out_leaves):
            names = ", ".join(sorted(set(trainable.values())))
            exc = UncoveredParameterError(
                f"fxdp: trainable parameter(s) {names} used in {func_name(func)}, which no per-sample rule "
                "covers; training it would leave its gradient unclipped. Use the parameter through a "
                "supported layer (Linear, Conv, Embedding, LayerNorm/GroupNorm/RMSNorm, elementwise ops), "
                "or freeze it (requires_grad=False).")
            exc.param_names = _roots(trainable.values())
            return self.recorder.refuse(exc, func, args, kwargs, out)
        return out

    def _reentrant_call(self, region, names, func, args, kwargs):
        """A parameter use in the no-grad forward of a reentrant checkpoint: bound as in grad mode, and handed
        to the recorder, which reserves its tap for the recomputation in backward (``recorder.reentrant``)."""
        if not getattr(self.recorder, "replays_checkpoints", False):
            return self.recorder.refuse(checkpoint_refusal(names, func, reentrant=True), func, args, kwargs)
        with self.recorder.reentrant(region), torch.enable_grad():
            out = self._call(func, args, kwargs)
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)

    def _refuse_batch_mixing(self, func, args, kwargs):
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        if training:
            exc = SampleMixingError(
                f"fxdp: {func_name(func)}: {BATCH_MIXING[func]}, so each sample's output depends on the other "
                f"samples and per-sample clipping bounds nothing. {SUGGEST}")
            self.recorder.refuse(exc, None, args, kwargs)

