"""Recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (tanh / relu), decomposed into covered ops.

``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu`` (what the modules call) are run
as the textbook recurrences written with ``F.linear`` and elementwise ops, which the interceptor sees in
turn: per layer and direction, one input projection over all time steps (``F.linear(x, W_ih, b_ih)``: one
use with T rows per sample) and one hidden projection per step (``F.linear(h_{t-1}, W_hh, b_hh)``); with
``proj_size`` also ``F.linear(h_t, W_hr)`` per step. The linear rule gives each use's per-sample factor; a
weight shared across time is one parameter used T times, so the engine's norm is that of the sum over
steps (its factors are merged into one low-rank factor over the T x B rows: ghost norm, cross terms across
time included, see :func:`fxdp.rules.factors.merge_factors`).

Covered: multi-layer, bidirectional, ``batch_first`` both ways, ``proj_size``, user initial states, biases
or none, dropout between layers. Refused: packed sequences (``PackedSequence``: the samples are ragged
slices of one flat tensor, the same reason as ``F.embedding_bag`` with offsets) -- pad them instead and
mask the loss. At t = 0 with no user state the hidden projection of the zero state is skipped (only its
bias remains), exactly as the fused kernel computes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxdp.core.errors import UncoveredParameterError
from fxdp.rules.base import OpCall, NoFactorsRule

MODES = {torch.lstm: "LSTM", torch.gru: "GRU", torch.rnn_tanh: "RNN_TANH", torch.rnn_relu: "RNN_RELU"}


def _cell(mode, xw_t, h, c, w_hh, b_hh, w_hr, first):
    hh = None
    if not first:
        hh = F.linear(h, w_hh, b_hh)
    elif b_hh is not None:
        hh = b_hh
    if mode == "LSTM":
        gates = xw_t if hh is None else xw_t + hh
        i, f, g, o = gates.chunk(4, -1)
        ig = torch.sigmoid(i) * torch.tanh(g)
        c = ig if first and c is None else torch.sigmoid(f) * c + ig
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, c
    if mode == "GRU":
        xr, xz, xn = xw_t.chunk(3, -1)
        hr, hz, hn = (None, None, None) if hh is None else hh.chunk(3, -1)
        r = torch.sigmoid(xr if hr is None else xr + hr)
        z = torch.sigmoid(xz if hz is None else xz + hz)
        n = torch.tanh(xn if hn is None else xn + r * hn)
        h_new = (1 - z) * n if first and h is None else (1 - z) * n + z * h
        return h_new, None
    pre = xw_t if hh is None else xw_t + hh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def run_recurrent(mode, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """The recurrence of ``torch.<mode>`` (dense input) in covered ops; same outputs as the fused kernel."""
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    has_proj = per == (5 if has_biases else 3)
    seq = x.transpose(0, 1) if batch_first else x                      # (T, B, F)
    T = seq.shape[0]
    h0, c0 = (hx if isinstance(hx, (tuple, list)) else (hx, None)) if hx is not None else (None, None)
    hs, cs = [], []
    layer_in = seq
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = (layer * dirs + d) * per
            w_ih, w_hh = params[k], params[k + 1]
            b_ih, b_hh = (params[k + 2], params[k + 3]) if has_biases else (None, None)
            w_hr = params[k + per - 1] if has_proj else None
            xw = F.linear(layer_in, w_ih, b_ih)                          # (T, B, G*H): one use, T rows per sample
            h = h0[layer * dirs + d] if h0 is not None else None
            c = c0[layer * dirs + d] if c0 is not None else None
            steps = range(T - 1, -1, -1) if d == 1 else range(T)
            out = [None] * T
            for n, t in enumerate(steps):
                h, c = _cell(mode, xw[t], h, c, w_hh, b_hh, w_hr, first=(n == 0 and h is None))
                out[t] = h
            outs.append(torch.stack(out, 0))
            hs.append(h)
            if mode == "LSTM":
                cs.append(c)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if dropout and train and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, True)
    output = layer_in.transpose(0, 1) if batch_first else layer_in
    if mode == "LSTM":
        return output, torch.stack(hs, 0), torch.stack(cs, 0)
    return output, torch.stack(hs, 0)


class RecurrentRule(NoFactorsRule):
    """Decomposes the fused recurrent ops (see module docstring); never binds a call itself."""

    name = "recurrent"
    funcs = tuple(MODES)

    def bind(self, call: OpCall):
        return None


    def decompose(self, call: OpCall):
        mode = MODES[call.func]
        a = call.args
        dense = len(a) >= 9 and isinstance(a[3], bool)  # packed: (data, batch_sizes, hx, params, has_biases, ...)
        if not dense:
            names = ", ".join(sorted(set(call.trainable.values())))
            raise UncoveredParameterError(
                f"fxdp: {mode} with a packed sequence uses {names}: the samples are ragged slices of one flat tensor, "
                "so fxdp cannot tell which rows belong to which sample. Pass a padded batch instead "
                "(torch.nn.utils.rnn.pad_packed_sequence / pad_sequence) and mask the padded steps in the loss.")
        x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = a[:9]
        return lambda: run_recurrent(mode, x, hx, list(params), has_biases, num_layers, dropout, train,
                                     bidirectional, batch_first)
