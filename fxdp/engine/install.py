"""``privatize`` / ``unprivatize``: the model object stays the same.

``privatize`` validates the configuration, plans the clip groups from the
module tree, and attaches an :class:`~fxdp.engine.engine.Engine` with two
forward hooks on the root module. No wrapper: the class, the Parameter
objects, ``state_dict()`` keys and ``isinstance`` are unchanged. The hooks are
module-level functions that look up ``module._fxdp_engine``, so ``copy.deepcopy``
and pickling carry a working privatized model; ``unprivatize`` removes the
hooks, the engine and every ``private_grad``.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import weakref

import torch
import torch.nn as nn

from fxdp.core.errors import PrivacyConfigError
from fxdp.core.config import DPConfig, make_config
from fxdp.analysis.plan_groups import plan_groups
from fxdp.engine import forward_checks, units
from fxdp.engine.engine import Engine
from fxdp.engine.writers import WRITERS

ENGINE_ATTR = "_fxdp_engine"

# Privatized models, weakly (a deep copy or an unpickled model joins at its first forward), so that
# privatizing a submodule of one is refused with the right reason.
_ROOTS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


# Disabled for dynamo: ``torch.compile(model)`` then runs them outside the compiled frame (no graph break).
@torch._dynamo.disable
def _pre_hook(module, args, kwargs):
    _ROOTS.add(module)
    refuse_inside_ddp_forward()
    module._fxdp_engine.before_forward(args, kwargs)


def refuse_inside_ddp_forward() -> None:
    """``DistributedDataParallel(fxdp.privatize(model))`` (or a privatized ``ddp.module``) runs the forward
    inside DDP's: DDP's reducer synchronises ``p.grad``, never ``p.private_grad``, so ranks would diverge
    and each would add its own noise. Refused, as wrapping before privatizing is."""
    if nn.parallel.DistributedDataParallel._active_ddp_module is not None:
        raise PrivacyConfigError(
            "fxdp: the privatized model runs inside a DistributedDataParallel forward; DDP synchronises p.grad, "
            "but fxdp writes p.private_grad after autograd, so ranks would diverge and each would add its own "
            "noise. Do not wrap a privatized model in DDP: pass the plain model to fxdp.DPDistributed, which "
            "broadcasts the parameters and sums the clipped gradients across ranks itself.")


@torch._dynamo.disable
def _post_hook(module, args, kwargs, output):
    module._fxdp_engine.after_forward(args, kwargs, output)


def get_engine(model: nn.Module) -> Optional[Engine]:
    """The engine of a privatized model, or None."""
    return model.__dict__.get(ENGINE_ATTR)


def engine_of(param) -> Optional[Engine]:
    """The engine that last wrote ``param.private_grad`` (None if none did).

    Lets an optimizer check that it calibrates noise to the bound the model
    clipped with (a mismatch is how Opacus #664 broke the guarantee)."""
    ref = WRITERS.get(param)
    return ref() if ref is not None else None


def is_privatized(model: nn.Module) -> bool:
    return get_engine(model) is not None


def refuse_data_parallel_wrappers(model: nn.Module) -> None:
    """``DistributedDataParallel`` / ``DataParallel`` / FSDP1 wrappers (the model or any submodule) are
    refused: their gradient synchronisation works on ``p.grad``, which the private path never writes,
    so ranks (or replicas) would train on their own data only and diverge, and noise would be added
    once per rank."""
    wrappers = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        wrappers.append(FullyShardedDataParallel)
    except ImportError:  # a torch build without distributed
        pass
    for name, m in model.named_modules():
        if isinstance(m, tuple(wrappers)):
            where = "the model" if not name else f"submodule {name!r}"
            raise PrivacyConfigError(
                f"fxdp: {where} is wrapped in {type(m).__name__}, whose gradient synchronisation works on p.grad; "
                "fxdp writes p.private_grad after autograd, so the wrapper never synchronises it (ranks would "
                "diverge, and each would add its own noise). Pass the plain model to fxdp.DPDistributed (it "
                "broadcasts the parameters and sums the clipped gradients across ranks itself), or privatize "
                "the unwrapped module for single-process training.")


def privatize(model: nn.Module, style="all-layer", max_grad_norm: float = 1.0, clipping_fn="abadi",
              numerical_stability_constant: Optional[float] = None, loss_reduction="mean",
              block_heads: Optional[Sequence[str]] = None, batch_dim=None,
              config: Optional[DPConfig] = None, grad_scaler=None,
              public_buffers: Sequence[str] = ()) -> nn.Module:
    """Make ``model`` produce per-sample-clipped gradient sums in one backward pass.

    After ``loss.backward()`` every trainable parameter ``p`` has
    ``p.private_grad = sum_b C_b * grad_p(loss_b)`` (accumulated over several
    backward calls until cleared), and ``p.grad`` is left untouched.

    Args:
        model: any ``nn.Module``; it is returned as the same object.
        style: "all-layer", "layer-wise", "param-wise" or "block-wise".
        max_grad_norm: R, the bound on each sample's whole clipped gradient.
        clipping_fn: "abadi", "automatic" or "global".
        numerical_stability_constant: gamma (1e-6 abadi, 1e-2 automatic by default).
        loss_reduction: "mean" if the loss averages per-sample losses over the
            batch, "sum" if it sums them. A token-level mean over the whole
            batch is *not* a per-sample loss: see ``fxdp.per_sample_loss``.
        block_heads: module names each starting a block (block-wise).
        batch_dim: batch dimension of the model's tensor inputs (default 0).
        config: a ready :class:`DPConfig` instead of the keywords above.
        grad_scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` is
            backpropagated, if any: its scale is undone before clipping, so the
            loss scale never changes the clipping threshold (also settable later
            as ``fxdp.get_engine(model).grad_scaler``).
        public_buffers: names of buffers that may change during a training forward because they do
            not depend on the data (a step counter). Any other buffer updated during a private forward
            (an EMA normaliser, running statistics) is refused: ``state_dict`` would release it
            unclipped and un-noised.

    Raises:
        ValueError: bad arguments, already privatized, no trainable parameter, a model wrapped in
            DistributedDataParallel / DataParallel / FSDP (use ``fxdp.DPDistributed``).
        fxdp.core.errors.PrivacyError subclasses at the first forward pass in grad
        mode when a parameter is used where no rule covers it, samples are
        mixed, or the batch layout cannot be determined; at every forward pass, when a trainable
        parameter reaches the output other than through a covered op (a custom
        ``torch.autograd.Function``, a view cached at ``__init__``), a parameterised submodule is
        called outside the model's forward in grad mode, or a non-public buffer was updated
        (:mod:`fxdp.engine.forward_checks`).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"fxdp: privatize expects an nn.Module, got {type(model).__name__}.")
    if is_privatized(model):
        raise ValueError("fxdp: this model is already privatized; call fxdp.unprivatize(model) first.")
    refuse_data_parallel_wrappers(model)
    lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise PrivacyConfigError(
            f"fxdp: {', '.join(lazy[:3])} {'is a' if len(lazy) == 1 else 'are'} lazy parameter(s) (nn.LazyLinear / "
            "LazyConv...) not initialised yet; fxdp plans the per-sample rules from the parameters' shapes. Run one "
            "forward pass on a batch (under torch.no_grad()) before fxdp.privatize(model).")
    inner = [name for name, m in model.named_modules() if name and is_privatized(m)]
    if inner:
        raise ValueError(f"fxdp: submodule(s) {inner[:3]} are already privatized; one loss must have one engine "
                         "(two would each clip a sample to R). Unprivatize them and privatize the whole model.")
    for root in list(_ROOTS):
        if root is not model and is_privatized(root):
            where = next((name for name, m in root.named_modules() if m is model), None)
            if where is not None:
                raise ValueError(
                    f"fxdp: this module is submodule {where!r} of a model that is already privatized ("
                    f"{type(root).__name__}); one loss must have one engine (two would each clip a sample to R). "
                    "Train it through the privatized model, or unprivatize that model first.")
    if config is None:
        config = make_config(style, max_grad_norm, clipping_fn, numerical_stability_constant, loss_reduction,
                             block_heads, batch_dim)
    public = forward_checks.check_public_buffers(model, public_buffers)
    plan = plan_groups(model, config)
    engine = Engine(model, config, plan)
    engine.grad_scaler = grad_scaler
    engine.public_buffers = public
    model.__dict__[ENGINE_ATTR] = engine
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    forward_checks.install_submodule_hooks(model)
    _ROOTS.add(model)
    return model


def unprivatize(model: nn.Module) -> nn.Module:
    """Undo ``privatize``: hooks, engine and every ``private_grad`` are removed."""
    if not is_privatized(model):
        raise ValueError("fxdp: this model is not privatized.")
    for store_name in ("_forward_pre_hooks", "_forward_hooks"):
        store = getattr(model, store_name)
        for hid in [k for k, fn in store.items() if fn in (_pre_hook, _post_hook)]:
            del store[hid]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                          "_forward_hooks_always_called"):
                getattr(model, extra, {}).pop(hid, None)
    forward_checks.remove_submodule_hooks(model)
    del model.__dict__[ENGINE_ATTR]
    for p in model.parameters():
        if hasattr(p, "private_grad"):
            del p.private_grad
    return model


@contextlib.contextmanager
def privacy_units(model, ids=None, *, views: Optional[int] = None, layout: Optional[str] = None):
    """Clip the summed gradient of each privacy unit once, in one backward (:mod:`fxdp.engine.units`).

    Args:
        model: a privatized model (``fxdp.privatize``).
        ids: one integer id per row of each forward pass inside the block; rows with the same id are
            one unit (e.g. ``torch.arange(N).repeat(K)`` for K views concatenated, a user id per
            example for user-level DP, ``torch.arange(B).repeat_interleave(T)`` for tokens flattened
            to (B·T, d) before the model).
        views: instead of ids: each forward has K·N rows, K views of each of N examples.
        layout: with ``views``, required: ``"stacked"`` (``torch.cat([aug(x) for _ in range(K)])``: row r
            belongs to example r mod N) or ``"interleaved"`` (``x.repeat_interleave(K, 0)``: row r belongs
            to example r // K).

    Example::

        with fxdp.privacy_units(model, views=K, layout="stacked"):
            loss = F.cross_entropy(model(torch.cat(views)), y.repeat(K))
            loss.backward()
    """
    engine = get_engine(model)
    if engine is None:
        raise ValueError("fxdp: privacy_units needs a privatized model (fxdp.privatize(model) first).")
    scope = units.make_scope(ids, views, layout)
    if engine.unit_scope is not None:
        raise ValueError("fxdp: privacy_units blocks do not nest.")
    engine.unit_scope = scope
    try:
        yield engine.unit_scope
    finally:
        engine.unit_scope = None


def clear_private_grads(model: nn.Module) -> None:
    """Drop every ``p.private_grad`` (the optimizer does this after each step), the unclipped count
    recorded with them and the engine's record of the samples behind them."""
    for p in model.parameters():
        if hasattr(p, "private_grad"):
            del p.private_grad
    engine = get_engine(getattr(model, "_orig_mod", model))
    if engine is not None:
        engine.clip_bound.clear_pending()
        engine.ledger.reset()


def ensure_privatized(module: nn.Module, *, batch_first: bool = True, batch_dim=None, style="all-layer",
                      max_grad_norm: float = 1.0, clipping_fn="abadi", numerical_stability_constant=None,
                      loss_reduction="mean", block_heads=None) -> Engine:
    """Privatize ``module`` for an engine-style entry point (Opacus conventions:
    ``batch_first=False`` means ``batch_dim=1``), or check that its existing
    configuration is the requested one. Returns the module's engine."""
    if not batch_first:
        if batch_dim not in (None, 1):
            raise ValueError("fxdp: batch_first=False means batch_dim=1; do not give both.")
        batch_dim = 1
    config = make_config(style, max_grad_norm, clipping_fn, numerical_stability_constant, loss_reduction,
                         block_heads, batch_dim)
    engine = get_engine(module)
    if engine is None:
        privatize(module, config=config)
        return get_engine(module)
    if engine.config != config:
        raise ValueError(f"fxdp: the module is already privatized with {engine.config}; call "
                         "fxdp.unprivatize(module) first to change the configuration.")
    return engine
