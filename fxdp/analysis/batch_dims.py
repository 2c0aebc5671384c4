"""Where the batch dimension is after one torch op: the rules of the structural mixing check.

:class:`fxdp.analysis.mixing_monitor.MixingMonitor` keeps, for every tensor derived from the
batched inputs during an eager training forward, a :data:`Place`: the dimension that holds the
samples and its *inner factor* ``k`` (the dimension has ``B * k`` entries, sample-major: rows
``i*k .. i*k+k-1`` belong to sample ``i``, as after ``(B, T, d).view(B * T, d)``), or ``None``
when the position is unknown. A rule maps the places of an op's inputs to the place of its
output and raises :class:`Mixing` when the op moves values across that dimension:

- a reduction (sum, mean, max, std, norm, logsumexp, argmax, ...) or a scan / sort along it
  (cumsum, softmax, sort, topk, ...);
- slicing or indexing along it that is not the identity (``:`` or an index equal to
  ``arange(B)``; ``h[4:]``, ``h[0]``, ``h[perm]``, a boolean mask), ``index_select`` / ``gather`` /
  ``narrow`` / ``split`` / ``chunk`` / ``unbind`` / ``roll`` / ``flip`` / ``repeat`` along it, writing
  batch-derived values into selected rows (``h[0] = h[1]``), ``cat`` of batch-derived rows along it;
- a contraction over it (``h.T @ h``, ``einsum('bi,bj->ij')``, ``F.linear`` on a tensor whose last
  dimension is the batch), a convolution or normalisation whose statistics span it
  (``layer_norm`` over it, ``group_norm`` / ``conv`` with the batch anywhere but dim 0),
  attention whose keys or features are samples;
- a reshape that regroups it with other dimensions (``h.t().reshape(h.shape)``), a table or weight computed
  from the batch (``embedding_bag`` / ``F.embedding`` / ``F.linear``), broadcasting samples against
  other samples (``h[None] * h[:, None]``, ``text @ image.T``), pooling, padding, FFTs, integration,
  distances, linear solves or ``sum_to_size`` along it (:mod:`fxdp.analysis.batch_transforms`).

Rules raise only for floating-point tensors (``Mixing.tensor``): masks, counts and indices carry
no gradient. An op without a rule here that gets a tensor whose position is known is refused by
:func:`untracked` unless it is in :data:`PER_SAMPLE_UNTRACKED`; a rule that returns ``None`` (or a
place that does not fit the output) loses the position for that tensor and what it derives, and only
the checks that need no position apply to it (see the monitor's docstring).
"""
from __future__ import annotations

import inspect

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from torch.utils._pytree import tree_flatten

from fxdp.analysis.batch_index import getitem_place, setitem_place
from fxdp.analysis.batch_layers import (
    batch_of, conv, embedding_bag, linear, loss, mha, norm_layer, recurrent, recurrent_cell, sdpa, spatial)
from fxdp.analysis.batch_rules import (
    Mixing, Untracked, cat, einsum, elementwise, expand, matmul_family, movedim, permute, repeat, reshape)
from fxdp.analysis.batch_reduce import ALONG, REDUCE, SELECT, reduction, select
from fxdp.analysis.batch_transforms import (
    FFT, MATRIX, cdist, complex_view, fft, matrix, pad, per_position, solve, sum_to_size, trapezoid, unfold)

Place = Optional[Tuple[int, int]]
T = torch.Tensor
__all__ = ["Mixing", "Place", "RULES", "PER_SAMPLE_UNTRACKED", "fresh_ops", "rule_key", "untracked"]


def _funcs(names, owners=(torch, T, F, torch.linalg, torch.special)):
    out = []
    for n in names:
        for owner in owners:
            f = getattr(owner, n, None)
            if callable(f):
                out.append(f)
    return out


ELEMENTWISE = """abs absolute acos arccos acosh arccosh add addcdiv addcmul angle asin arcsin asinh arcsinh atan arctan
atan2 arctan2 atanh arctanh bitwise_and bitwise_or bitwise_xor bitwise_not ceil clamp clamp_min clamp_max clip copysign
cos cosh deg2rad div divide true_divide floor_divide erf erfc erfinv exp exp2 expm1 float_power floor fmod frac lerp
lgamma log log10 log1p log2 logaddexp logaddexp2 logical_and logical_or logical_xor logical_not logit hypot i0 mul
multiply nan_to_num neg negative positive pow rad2deg reciprocal remainder round rsqrt sigmoid sign sgn signbit sin
sinc sinh sqrt square sub subtract tan tanh trunc fix xlogy where maximum minimum fmax fmin eq ne lt le gt ge greater
greater_equal less less_equal not_equal isnan isinf isfinite isposinf isneginf isclose isreal masked_fill heaviside
relu relu6 gelu silu mish hardtanh hardswish hardsigmoid elu selu celu leaky_relu prelu rrelu softplus softsign
tanhshrink threshold logsigmoid hardshrink softshrink dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d
dropout3d to type type_as float double half bfloat16 int long bool short byte char cfloat cdouble contiguous clone
detach cpu cuda requires_grad_ copy_ conj resolve_conj resolve_neg real imag expit exp2 ndtr ndtri log_ndtr erfcx
sinc xlog1py entr polygamma digamma mvlgamma index_fill zero_ fill_ normal_ uniform_ bernoulli bernoulli_ pin_memory
__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__
__div__ __rdiv__ __idiv__ __floordiv__ __rfloordiv__ __ifloordiv__ __mod__ __rmod__ __imod__ __pow__ __rpow__ __ipow__
__neg__ __pos__ __abs__ __and__ __rand__ __iand__ __or__ __ror__ __ior__ __xor__ __rxor__ __ixor__ __invert__
__eq__ __ne__ __lt__ __le__ __gt__ __ge__ __lshift__ __rshift__""".split()
INPLACE = [n + "_" for n in ELEMENTWISE if not n.startswith("_") and not n.endswith("_")]
FRESH = """zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones new_empty
new_full new_tensor""".split()
RESHAPE = "view reshape view_as reshape_as flatten unflatten squeeze unsqueeze ravel atleast_1d atleast_2d atleast_3d".split()
EXPAND = "expand expand_as broadcast_to".split()
PERMUTE = "permute transpose swapaxes swapdims t adjoint".split()
MOVEDIM = "movedim moveaxis".split()
CAT = "cat concat concatenate stack vstack row_stack hstack dstack".split()
MATMUL = "matmul __matmul__ __rmatmul__ mm bmm baddbmm addmm addbmm addmv mv dot vdot inner outer ger".split()
CONV = "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split()
SPATIAL = """avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d max_pool1d_with_indices
max_pool2d_with_indices max_pool3d_with_indices adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d lp_pool1d lp_pool2d lp_pool3d interpolate upsample
upsample_nearest upsample_bilinear pixel_shuffle pixel_unshuffle channel_shuffle grid_sample""".split()
NORMS = "layer_norm rms_norm group_norm instance_norm local_response_norm batch_norm".split()
LOSSES = """cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy
binary_cross_entropy_with_logits kl_div poisson_nll_loss gaussian_nll_loss soft_margin_loss
multilabel_soft_margin_loss""".split()


def _table() -> Dict[Callable, Callable]:
    rules: Dict[Callable, Callable] = {}

    def put(names, rule, owners=(torch, T, F, torch.linalg, torch.special)):
        for f in _funcs(names, owners):
            rules.setdefault(f, rule)

    put(["__getitem__"], getitem_place, (T,))
    put(["__setitem__"], setitem_place, (T,))
    put(["index_put", "index_put_"], setitem_place, (torch, T))
    for kind, names in REDUCE.items():
        for n in names:
            put([n], reduction(n, kind))
    for n, spec in ALONG.items():
        put([n], reduction(n, spec))
    for n, spec in SELECT.items():
        put([n], select(n, spec), (torch, T))
    put(RESHAPE, reshape)
    put(EXPAND, expand)
    put(PERMUTE, permute)
    put(MOVEDIM, movedim)
    put(["repeat", "tile", "repeat_interleave"], repeat)
    put(CAT, cat)
    put(MATMUL, matmul_family)
    put(["einsum"], einsum)
    put(["linear", "bilinear"], linear, (F,))
    put(CONV, conv)
    put(SPATIAL, spatial, (F, torch))
    put(NORMS, norm_layer, (F, torch))
    put(["scaled_dot_product_attention"], sdpa, (F,))
    put(["multi_head_attention_forward"], mha, (F,))
    put(LOSSES, loss, (F,))
    put(["embedding", "one_hot"], batch_of, (F,))
    put(["embedding_bag"], embedding_bag, (F,))
    put(["lstm", "gru", "rnn_tanh", "rnn_relu"], recurrent, (torch,))
    put(["lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"], recurrent_cell, (torch,))
    put(["pad"], pad, (F, torch._C._nn))
    for n in FFT:
        put([n], fft(n), (torch.fft,))
    put(["trapezoid", "trapz", "cumulative_trapezoid"], trapezoid, (torch,))
    put(["cdist"], cdist, (torch,))
    put(["solve"], solve, (torch.linalg,))
    put(MATRIX + ["inverse"], matrix, (torch.linalg, torch, T))
    put(["sum_to_size"], sum_to_size, (T,))
    put(["view_as_real", "view_as_complex"], complex_view, (torch,))
    put(["unfold"], unfold, (F,))
    put(["rsub", "polar", "complex"], elementwise, (torch,))
    put(["triu", "tril", "triu_", "tril_"], per_position, (torch, T))
    put(["broadcast_tensors", "__deepcopy__"], elementwise, (torch, T))
    put(ELEMENTWISE + INPLACE, elementwise)
    for prop in ("T", "mT", "H", "mH", "data", "real", "imag"):
        # a property's getter reaches __torch_function__ as a fresh method-wrapper: key by its descriptor
        rules[inspect.getattr_static(T, prop)] = permute if prop in ("T", "mT", "H", "mH") else elementwise
    return rules


RULES = _table()
_FRESH = frozenset(_funcs(FRESH, (torch, T)))
# Ops without a rule proven per-sample for whatever batch position they get (their tensor outputs hold
# no value of their inputs across samples); any other op without a rule refuses a tensor whose batch
# position is known (:func:`untracked`).
PER_SAMPLE_UNTRACKED = frozenset(_funcs("detach_ retain_grad share_memory_".split(), (T,)))


def untracked(ctx, func, args, kwargs, out):
    """The place after an op :data:`RULES` has no rule for (or whose rule cannot read this call).

    Refused (:class:`Untracked`) when an input's batch position is known and the op returns a
    floating-point tensor other than one of its inputs: fxdp cannot tell whether the op moves values
    between samples (an FFT, a pooling, a solve, a custom kernel across the batch), and an op that does,
    gated on the batch size (``if B > 3``), is seen neither by this check nor by the numeric probe.
    Otherwise the position of the output is unknown (None); an op returning its input keeps its place."""
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if outs and all(any(o is t for t in leaves) for o in outs):
        return ctx.KEEP
    values = [o for o in outs if o.is_floating_point() or o.is_complex()]
    known = [(t, ctx.place(t)) for t in leaves if isinstance(ctx.place(t), tuple)]
    if not values or not known or rule_key(func) in PER_SAMPLE_UNTRACKED:
        return None
    t, (bd, k) = known[0]
    raise Untracked(f"gets a tensor computed from the batch (shape {tuple(t.shape)}, batch dimension {bd})",
                    any(x.requires_grad for x, _ in known) or any(o.requires_grad for o in values))


def rule_key(func):
    """The key of ``func`` in :data:`RULES` (a property getter is keyed by its descriptor)."""
    return func.__self__ if getattr(func, "__name__", None) == "__get__" else func


def fresh_ops():
    """Ops whose output holds no value of their input (``zeros_like``, ``new_zeros``): not derived."""
    return _FRESH

