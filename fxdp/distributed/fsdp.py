"""FSDP2 (``torch.distributed.fsdp.fully_shard``) models: what fxdp supports, and the parameter view.

Under FSDP2 every managed parameter has two identities (see :mod:`fxdp.core.identity`): the sharded
DTensor parameter (``Shard(0)`` over a 1-D mesh) registered outside forward -- the optimizer's, on
which fxdp writes ``private_grad`` -- and the unsharded tensor that FSDP2 registers for the forward
and backward of its module. :class:`FSDPView` names both with the canonical parameter name, so
tied and reused parameters (one FSDPParam registered on several modules), frozen parameters and
LoRA adapters are keyed by name, whatever identity a layer sees; clip groups and blocks are planned
from the names, so every style is keyed correctly.

The unsharded identities are created by FSDP2 at a parameter's first all-gather and kept afterwards
(its storage is freed and re-allocated, the object stays). :func:`materialize_unsharded` creates
them at setup (one all-gather of each FSDP module in turn, then a reshard), and the view checks at
every use that they are still the same objects: an identity the engine does not know would let a
layer's gradient bypass clipping, so a changed one is refused (:class:`ShardingError`).

Refused, with what to do instead (:func:`refuse_unsupported_fsdp`): HSDP or any mesh of more than one
dimension, parameters that were already DTensors before ``fully_shard`` (tensor parallelism),
CPU offload (``CPUOffloadPolicy``: the gradients would be moved to the CPU inside FSDP2's
reduce-scatter, which fxdp does not use), a ``shard_placement_fn`` sharding another dimension than 0,
FSDP1 (``FullyShardedDataParallel``), and a model whose FSDP2 units span several process groups.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from fxdp.core.errors import PrivacyConfigError
from fxdp.distributed.shards import ShardingError, reduce_scatter_rows


def fsdp_modules(model: nn.Module) -> List[nn.Module]:
    """The FSDP2 modules of ``model`` (``fully_shard`` applied), root first, in module order."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fully_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def fsdp_params(model: nn.Module) -> list:
    """Every FSDPParam of ``model``'s FSDP2 modules (FSDP2's own records, read-only here)."""
    out = []
    for m in fsdp_modules(model):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            out.extend(group.fsdp_params)
    return out


def refuse_unsupported_fsdp(model: nn.Module, process_group=None) -> None:
    """Raise :class:`ShardingError` / ValueError for sharded setups fxdp does not support (module docstring)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._fully_shard._fsdp_common import HSDPMeshInfo

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise PrivacyConfigError("fxdp: FSDP1 (FullyShardedDataParallel) is not supported; shard the model with FSDP2 "
                         "(torch.distributed.fsdp.fully_shard) instead.")
    roots = fsdp_modules(model)
    if roots and roots[0] is not model:
        raise ValueError("fxdp: the model's root module is not fully_shard-ed; call fully_shard(model) on the "
                         "root after sharding its blocks (FSDP2's usual order).")
    group_ranks = None
    for fp in fsdp_params(model):
        name = f"{type(fp._module_info.module).__name__}.{fp._module_info.param_name}"
        mesh = fp.mesh_info.mesh
        if isinstance(fp.mesh_info, HSDPMeshInfo) or mesh.ndim != 1:
            raise ShardingError(
                f"fxdp: parameter {name} is sharded over a {mesh.ndim}-D mesh (HSDP or a replicate dimension). "
                "fxdp supports FSDP2 over a 1-D mesh of all data-parallel ranks only; its noise and reduction "
                "assume every rank owns a disjoint shard. Use fully_shard(module) with the default mesh.")
        if fp.is_dtensor:
            raise ShardingError(
                f"fxdp: parameter {name} was a DTensor before fully_shard (tensor or sequence parallelism). Its "
                "rows on one rank are not whole per-sample gradients, so fxdp cannot clip them; use FSDP2 alone.")
        if fp.offload_to_cpu:
            raise ShardingError(
                "fxdp: FSDP2 CPU offload (CPUOffloadPolicy) is not supported: fxdp reduce-scatters the clipped "
                "sums itself at the optimizer step, outside FSDP2's offloaded gradient path. Drop offload_policy.")
        placement = fp.fsdp_placement
        if getattr(placement, "dim", 0) != 0:
            raise ShardingError(
                f"fxdp: parameter {name} is sharded on dim {placement.dim}; fxdp supports Shard(0) only (drop "
                "shard_placement_fn).")
        ranks = tuple(dist.get_process_group_ranks(fp.mesh_info.shard_process_group))
        if group_ranks is None:
            group_ranks = ranks
        elif ranks != group_ranks:
            raise ShardingError("fxdp: the FSDP2 modules of this model are sharded over different process groups; "
                                "use one mesh for the whole model.")
    if group_ranks is not None:
        expected = tuple(dist.get_process_group_ranks(process_group)) if process_group is not None \
            else tuple(range(dist.get_world_size()))
        if group_ranks != expected:
            raise ShardingError(
                f"fxdp: the model is sharded over ranks {list(group_ranks)} but the DP process group has ranks "
                f"{list(expected)}; they must be the same ranks (one shard of every parameter per DP rank).")


def refuse_compiled_blocks(model: nn.Module) -> None:
    """torch.compile inside an FSDP2 model (``torch.compile(block)`` or ``block.compile()``) is refused:
    fxdp's compiled path cannot see FSDP2's unsharded parameters inside a compiled block yet."""
    from torch._dynamo.eval_frame import OptimizedModule
    compiled = [n or "<root>" for n, m in model.named_modules()
                if isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None]
    if compiled:
        raise ShardingError(
            f"fxdp: module(s) {compiled[:3]} of this FSDP2 model are compiled. fxdp does not support "
            "torch.compile per block under FSDP2 yet (its compiled taps would not see FSDP2's unsharded "
            "parameters); run the sharded model eagerly.")


@torch.no_grad()
def materialize_unsharded(model: nn.Module) -> None:
    """Collective: all-gather then reshard every FSDP2 module once, so that FSDP2 creates the unsharded
    identity of each parameter now (it keeps it afterwards); root first, in module order on every rank."""
    for m in fsdp_modules(model):
        m.unshard()
        m.reshard()


def front_load_engine_hook(model: nn.Module) -> None:
    """Run fxdp's forward pre-hook before FSDP2's, so that the layout analysis (whose probe forwards
    are complete FSDP2 iterations of their own) happens before FSDP2 opens the real forward."""
    from fxdp.engine.install import _pre_hook
    hooks = model._forward_pre_hooks
    for hid, fn in list(hooks.items()):
        if fn is _pre_hook:
            hooks.move_to_end(hid, last=False)
            return
    raise ShardingError("fxdp: the model is not privatized; this is a bug in fxdp.")


class FSDPView:
    """The :class:`fxdp.core.identity.ParameterView` of an FSDP2 model (module docstring).

    It also makes the layout analysis collective (:meth:`collective_analysis`): its probe forwards
    all-gather parameters, so every rank must run them at the same time on the same examples."""

    def __init__(self, model: nn.Module, process_group=None):
        self.process_group = process_group
        sharded = {}
        for name, p in model.named_parameters():
            sharded.setdefault(id(p), name)
        self.entries = []  # (name, FSDPParam, unsharded identity at setup)
        self.names: Dict[str, nn.Parameter] = {}
        for fp in fsdp_params(model):
            name = sharded.get(id(fp.sharded_param))
            if name is None:
                raise ShardingError("fxdp: an FSDP2 parameter is not registered on the model (call fxdp after "
                                    "fully_shard, outside forward, with the parameters sharded).")
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is None:
                raise ShardingError("fxdp: FSDP2 has not created the unsharded parameters; this is a bug in fxdp "
                                    "(materialize_unsharded runs at setup).")
            self.entries.append((name, fp, unsharded))
        for name, p in model.named_parameters():
            self.names[name] = p
        self._aliases = {id(u): name for name, fp, u in self.entries if fp.sharded_param.requires_grad}
        for name, fp, _ in self.entries:
            self._aliases[id(fp.sharded_param)] = name

    def check_current(self) -> None:
        for name, fp, unsharded in self.entries:
            if getattr(fp, "_unsharded_param", None) is not unsharded:
                raise ShardingError(
                    f"fxdp: FSDP2 replaced the unsharded parameter of {name!r} after setup (model.to(), "
                    "load_state_dict with assign, or a re-sharding); its uses would not be clipped. Call "
                    "make_private again on the re-sharded model.")

    def aliases(self) -> Dict[int, str]:
        self.check_current()
        return {k: v for k, v in self._aliases.items() if self.names[v].requires_grad}

    def targets(self) -> Dict[str, nn.Parameter]:
        return dict(self.names)

    def collective_analysis(self, engine, key, args, kwargs, batch_size: int):
        """Collective, at every forward until an input structure is analysed: the ranks compare their
        structure keys and batch sizes; if some rank has B >= 2, the first such rank's first (up to 3)
        examples are broadcast and every rank analyses them, so every rank holds the same layout table.
        Returns None while no rank has two examples (batches of one need no analysis)."""
        import torch.distributed as dist
        from fxdp.analysis.capture import select_samples
        from fxdp.distributed.agreement import all_gather_ints, digest

        group = self.process_group
        table = all_gather_ints([digest(repr(key)), int(batch_size)], group)
        if not bool((table[:, 0] == table[0, 0]).all()):
            raise ShardingError("fxdp: the ranks call the sharded model with inputs of different structures "
                                "(tensors, dtypes, keywords); every rank must pass the same structure.")
        sizes = table[:, 1].tolist()
        source = next((r for r, b in enumerate(sizes) if b >= 2), None)
        if source is None:
            return None
        payload = [None]
        if dist.get_rank(group) == source:
            n = min(batch_size, 3)
            payload = [select_samples(args, kwargs, engine.config.batch_dim_spec, list(range(n)))]
        src = dist.get_global_rank(group, source) if group is not None else source
        dist.broadcast_object_list(payload, src=src, group=group)
        device = next((t.device for t in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor)), torch.device("cpu"))
        ex_args, ex_kwargs = torch.utils._pytree.tree_map(
            lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, payload[0])
        n = min(sizes[source], 3)
        return engine.layout_table(engine.analyse(ex_args, ex_kwargs, n))

    def convert_private_grad(self, name: str, p, total: torch.Tensor):
        """Collective (every rank, every trainable parameter, in plan order, at the end of each backward):
        reduce-scatter this rank's full clipped sum ``total`` into the rows it owns and return them as a
        DTensor with p's sharding; the full-size sum is dropped at once (fxdp.distributed.fsdp_optimizer)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        group = self.process_group
        grads = {id(p): total}
        reduce_scatter_rows([p], grads, dist.get_rank(group), dist.get_world_size(group), group=group)
        local = grads[id(p)].to(p.dtype).contiguous()
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
