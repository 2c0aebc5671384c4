"""The structural mixing check tracks where the batch dimension is through the ops that ran
(fxdp.analysis.batch_dims), refuses ops that move values across it, and allows the identity.

Each test runs ops under a MixingMonitor in strict mode (a rule that fails raises instead of
losing the position) and checks the tracked place (dim, inner factor) against what the op does.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxdp.analysis.batch_rules import ABSENT
from fxdp.analysis.mixing_monitor import MixingMonitor
from fxdp.core.errors import SampleMixingError

B, T, D = 4, 5, 6


def monitor(*inputs, dims=None):
    return MixingMonitor(list(inputs), B, batch_dims=dims or [0] * len(inputs), strict=True)


def test_batch_dim_is_tracked_through_reshape_permute_and_matmul():
    x, w = torch.randn(B, T, D), torch.randn(D, 3)
    with monitor(x) as m:
        flat = x.reshape(B * T, D)
        assert m.place(flat) == (0, T)          # rows b*T .. b*T+T-1 belong to sample b
        back = flat.view(B, T, D).permute(2, 0, 1)
        assert m.place(back) == (1, 1)
        assert m.place(x.transpose(0, 1)) == (1, 1) and m.place(x.movedim(0, -1)) == (2, 1)
        assert m.place(x @ w) == (0, 1) and m.place(torch.matmul(x.transpose(0, 1), w)) == (1, 1)
        heads = x.view(B, T, 2, 3).transpose(1, 2)   # (B, H, T, d)
        scores = heads @ heads.transpose(-1, -2)
        assert m.place(scores) == (0, 1) and m.place(scores.softmax(-1)) == (0, 1)
        assert m.place(torch.einsum("bhtd,bhsd->bhts", heads, heads)) == (0, 1)
        assert m.place(x.unsqueeze(0).squeeze(0)) == (0, 1) and m.place(x[None]) == (1, 1)
        assert m.place(x.flatten(1)) == (0, 1) and m.place(x.unflatten(2, (2, 3))) == (0, 1)
        assert m.place(F.linear(x, torch.randn(3, D))) == (0, 1)
        assert m.place(x.sum(-1)) == (0, 1) and m.place(x.mean(1, keepdim=True)) == (0, 1)
        assert m.place(x.flatten(1).T) == (1, 1) and m.place(x.mT) == (0, 1)
        assert m.place(torch.cat([x, x], dim=1)) == (0, 1) and m.place(torch.stack([x, x])) == (1, 1)
        assert m.place(torch.zeros_like(x)) is ABSENT
        assert m.place(F.layer_norm(x, (D,))) == (0, 1) and m.place(x + torch.randn(T, D)) == (0, 1)


def test_seq_first_and_merged_dims_are_tracked():
    x = torch.randn(T, B, D, requires_grad=True)
    with monitor(x, dims=[1]) as m:
        assert m.place(x.reshape(T, B * 2, 3)) == (1, 2)
        assert m.place(x.transpose(0, 1).reshape(B * T, D)) == (0, T)
        assert m.place(x.reshape(T * B, D)) is None   # the batch is the inner factor: position lost
        with pytest.raises(SampleMixingError, match="together with other dimensions.*transpose"):
            x.reshape(B, T * D)                   # regrouped: rows of the result hold several samples
        conv_in = torch.randn(B, 3, 8, 8)
    with monitor(conv_in) as m:
        h = F.conv2d(conv_in, torch.randn(4, 3, 3, 3))
        assert m.place(h) == (0, 1) and m.place(F.group_norm(h, 2)) == (0, 1)
        assert m.place(F.interpolate(h, scale_factor=2.0)) == (0, 1) and m.place(F.avg_pool2d(h, 2)) == (0, 1)
        assert m.place(h.flatten(2).transpose(1, 2)) == (0, 1)


def test_identity_indexing_along_the_batch_is_allowed():
    x = torch.randn(B, T, D)
    ids = torch.randint(0, T, (B,))
    with monitor(x, ids) as m:
        picked = x[torch.arange(B), ids]        # HF GPT2ForSequenceClassification pooling
        assert m.place(picked) == (0, 1)
        assert m.place(x[:, 0]) == (0, 1) and m.place(x[..., :2]) == (0, 1) and m.place(x[0:B]) == (0, 1)
        assert m.place(x[:, torch.tensor([0, 2])]) == (0, 1)
        assert m.place(x.index_select(0, torch.arange(B))) == (0, 1)
        assert m.place(torch.randn(10, D)[ids]) == (0, 1)   # an embedding-like lookup by batch ids


@pytest.mark.parametrize("op, cause", [
    (lambda x: x + x.sum(0), "along dim 0, the batch dimension"),
    (lambda x: x - x.mean(dim=(0, 1), keepdim=True), "along dim 0"),
    (lambda x: x.logsumexp(0), "along dim 0"),
    (lambda x: x.cumsum(0), "cumsum along dim 0"),
    (lambda x: x.softmax(0), "softmax along dim 0"),
    (lambda x: x.sort(0).values, "sort along dim 0"),
    (lambda x: x.topk(2, dim=0).values, "topk along dim 0"),
    (lambda x: x.std(0), "std along dim 0"),
    (lambda x: x.norm(dim=0), "along dim 0"),
    (lambda x: x.argmax(0).float(), "argmax along dim 0"),
    (lambda x: x[4:] + x[:1] if x.shape[0] > 4 else x[1:] + x[:1], "slices the batch dimension"),
    (lambda x: x[0], "picks sample 0"),
    (lambda x: x[torch.tensor([1, 0, 2, 3])], "not arange(B)"),
    (lambda x: x[torch.tensor([True, False, True, True])], "masks rows"),
    (lambda x: x.roll(1, 0), "roll along dim 0"),
    (lambda x: x.flip(0), "flip along dim 0"),
    (lambda x: x.index_select(0, torch.tensor([0, 0, 1, 2])), "index_select along dim 0"),
    (lambda x: torch.cat([x, x]), "concatenates batch-derived rows"),
    (lambda x: x.repeat(2, 1, 1), "repeats the rows"),
    (lambda x: x.chunk(2)[0], "chunk along dim 0"),
    (lambda x: x.unbind(0)[0], "unbind along dim 0"),
    (lambda x: x.narrow(0, 1, 2), "narrow keeps rows 1..2"),
    (lambda x: x.flatten(1).T @ x.flatten(1), "contracts the batch dimension"),
    (lambda x: torch.einsum("btd,bte->de", x, x), "contracts the batch dimension (label 'b')"),
    (lambda x: F.linear(x.permute(1, 2, 0), torch.randn(3, B)), "linear layer"),
    (lambda x: F.layer_norm(x.permute(1, 2, 0), (B,)), "layer_norm"),
    (lambda x: x.gather(0, torch.zeros(B, T, D, dtype=torch.long)), "gather along dim 0"),
])
def test_ops_across_the_batch_dimension_are_refused_naming_op_and_dim(op, cause):
    x = torch.randn(B, T, D, requires_grad=True)
    with monitor(x), pytest.raises(SampleMixingError) as err:
        op(x)
    msg = str(err.value)
    assert "samples are mixed" in msg and cause in msg and "privacy_units" in msg, msg


def test_setitem_of_batch_rows_into_other_rows_is_refused_but_constants_are_not():
    x, other = torch.randn(B, T, D, requires_grad=True), torch.randn(T, D, requires_grad=True)
    with MixingMonitor([x, other], B, batch_dims=[0, None], strict=True):
        h = x * 2
        h[:, 0] = h[:, 1]          # along a sample's own dims
        h[0] = 0.0                 # a constant: moves no value between samples
        with pytest.raises(SampleMixingError, match="writes batch-derived values"):
            h[0] = other * 2       # batch-derived values (position unknown) written into sample 0


def test_integer_and_boolean_tensors_are_not_refused_and_their_full_reductions_are_held():
    """Counts / masks carry no gradient: not refused (token routing sorts and indexes them along the
    batch); a full reduction of one over the batch is held, and refused where it meets per-sample values
    (a normaliser of every sample's output, an ``any()`` gate)."""
    mask = torch.ones(B, T, dtype=torch.long)
    x = torch.randn(B, T, requires_grad=True)
    with monitor(mask, x) as m:
        counts = mask.sum(0)       # a count over the batch: no gradient
        assert m.place(counts) is None
        assert m.place(mask.bool()[:, :2]) == (0, 1)
        mask.argmax(0)
        mask[1:]
        x * mask                   # per-sample mask: fine
        with pytest.raises(SampleMixingError, match="across the batch dimension"):
            x / mask.sum()


def test_an_op_without_a_rule_on_a_tensor_with_a_known_batch_position_is_refused():
    """An op the rule table does not know (here torch.histc) could move values between samples; with the
    batch position of its input known it is refused, naming the op; on a tensor without gradient it is
    held and refused where it meets per-sample values. Where the position is already unknown (token
    routing) only the full-reduction refusal applies; integer outputs (counts) are not refused."""
    x = torch.randn(B, T, D, requires_grad=True)
    with monitor(x) as m:
        with pytest.raises(SampleMixingError, match="histc gets a tensor computed from the batch.*no rule"):
            torch.histc(x, bins=4)
        tokens = x.reshape(B * T, D)
        routed = tokens[torch.where(tokens.sum(-1) > 0)[0]]
        assert m.place(routed) is None
        torch.histc(routed, bins=4)                # position unknown: not refused
        with pytest.raises(SampleMixingError, match="over all its elements"):
            routed.sum()                           # a full reduction is refused whatever the position
        torch.bucketize(x, torch.tensor([0.0]))    # an integer result: no gradient
    raw = torch.randn(B, D)
    with MixingMonitor([raw], B, batch_dims=[0], strict=True):
        with torch.no_grad():
            hist = torch.histc(raw, bins=D)        # held: no gradient yet
        with pytest.raises(SampleMixingError, match="histc.*under torch.no_grad.*no rule"):
            nn.Linear(D, D)(raw + hist)


FOLLOWED = [  # per-sample uses of the ops a privacy review found without rules: the batch stays at dim 0
    ("embedding_bag", lambda x: F.embedding_bag((x[:, :3, 0] > 0).long(), torch.randn(9, D)), (0, 1)),
    ("linear with a batch weight", lambda x: F.linear(torch.randn(3, T * D), x.flatten(1)).T, (0, 1)),
    ("reshape keeping the batch", lambda x: x.transpose(0, 1).reshape(T, B * D).transpose(0, 1), (0, D)),
    ("write into a fresh tensor", lambda x: _written(torch.zeros(B, T + 1, D), (slice(None), slice(1, None)), x),
     (0, 1)),
    ("write into x", lambda x: _written(x * 1, (slice(None), slice(0, 2)), x[:, 1:3] * 2), (0, 1)),
    ("index_put with arange", lambda x: torch.zeros(B, T, D).index_put((torch.arange(B),), x), (0, 1)),
    ("pooling", lambda x: F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2), (0, 1)),
    ("2-D pooling", lambda x: F.max_pool2d(x[:, None], 2)[:, 0], (0, 1)),
    ("fft", lambda x: torch.fft.ifft(torch.fft.fft(x, dim=-1), dim=-1).real, (0, 1)),
    ("fft2", lambda x: torch.fft.irfft2(torch.fft.rfft2(x), s=(T, D)), (0, 1)),
    ("fftn", lambda x: torch.fft.fftn(x, dim=(1, 2)).abs(), (0, 1)),
    ("trapezoid", lambda x: torch.trapezoid(x, dim=1), (0, 1)),
    ("cumulative_trapezoid", lambda x: torch.cumulative_trapezoid(x, dim=-1), (0, 1)),
    ("cdist", lambda x: torch.cdist(x, x), (0, 1)),
    ("linalg.solve", lambda x: torch.linalg.solve(torch.eye(T) * 2 + 0.1, x), (0, 1)),
    ("sum_to_size", lambda x: x.sum_to_size(B, 1, D), (0, 1)),
    ("pad", lambda x: F.pad(x, (1, 1, 2, 0)), (0, 1)),
    ("broadcast", lambda x: x[:, None] * x[:, :, None], (0, 1)),
    ("complex views (rotary)", lambda x: torch.view_as_real(torch.view_as_complex(x[..., :2].contiguous()) * 1j),
     (0, 1)),
    ("polar", lambda x: torch.polar(x.abs(), x), (0, 1)),
    ("rsub", lambda x: torch.rsub(x, 1.0), (0, 1)),
    ("F.unfold (im2col)", lambda x: F.unfold(x[:, None], 2), (0, 1)),
    ("linalg.solve, vector right-hand side", lambda x: torch.linalg.solve(x[:, :, :T] + 3 * torch.eye(T), x[:, :, 0]),
     (0, 1)),
    ("baddbmm with keyword operands", lambda x: torch.zeros(1, T, T).baddbmm(batch1=x, batch2=x.transpose(1, 2)),
     (0, 1)),
]


def _written(z, index, value):
    z[index] = value
    return z


@pytest.mark.parametrize("name, op, place", FOLLOWED, ids=[n for n, _, _ in FOLLOWED])
def test_per_sample_uses_of_formerly_ruleless_ops_keep_the_batch_dimension(name, op, place):
    x = torch.randn(B, T, D, requires_grad=True)
    with monitor(x) as m:
        assert m.place(op(x)) == place, name


ACROSS = [  # the same ops across the batch dimension (each leaked up to 3.3 R gated on the batch size)
    (lambda x: F.embedding_bag(torch.zeros(B, 1, dtype=torch.long), x.flatten(1)), "table computed from the batch"),
    (lambda x: F.embedding(torch.zeros(B, dtype=torch.long), x.flatten(1)), "table computed from the batch"),
    (lambda x: F.linear(x.flatten(1), x.flatten(1)), "weight computed from the batch"),
    (lambda x: F.linear(torch.ones(2, B), x.flatten(1).T), "weight computed from the batch"),
    (lambda x: x.flatten(1).t().reshape(B, T * D), "together with other dimensions"),
    (lambda x: _written(torch.zeros(B, T, D), torch.tensor([1, 0, 2, 3]), x), "into a fresh tensor"),
    (lambda x: torch.zeros(B, T, D).index_put((torch.zeros(B, dtype=torch.long),), x, accumulate=True),
     "into a fresh tensor"),
    (lambda x: _written(x * 1, (slice(None), slice(0, B), 0), x[:, :B, 0].T), "elsewhere than its batch dimension"),
    (lambda x: F.avg_pool1d(x.permute(1, 2, 0), 3, 1, 1), "pools, resamples or shuffles along dim 2"),
    (lambda x: F.interpolate(x.permute(1, 2, 0), scale_factor=2.0), "resamples"),
    (lambda x: torch.fft.fft(x, dim=0), "transforms along dim 0"),
    (lambda x: torch.fft.fftn(x), "transforms along dim 0"),
    (lambda x: torch.trapezoid(x, dim=0), "integrates along dim 0"),
    (lambda x: torch.cdist(x[:, 0], x[:, 0]), "distances between samples"),
    (lambda x: torch.linalg.solve(torch.eye(B) + 0.1, x[:, 0]), "solves a linear system"),
    (lambda x: torch.linalg.inv(x[:, :B, :B].transpose(0, 2) + 3 * torch.eye(B)), "matrix function"),
    (lambda x: x.sum_to_size(1, T, D), "sums along dim 0"),
    (lambda x: x[None] * x[:, None], "broadcasts batch-derived tensors"),
    (lambda x: F.pad(x.transpose(0, 2), (1, 1)), "pads the batch dimension"),
    (lambda x: x.flatten(1) @ x.flatten(1).T, "outer product between samples"),
    (lambda x: F.unfold(x.transpose(0, 1)[:, None], 2), "unfolds patches across the batch dimension"),
    (lambda x: torch.triu(x[:, :, 0]), "by their index along the batch dimension"),
]


@pytest.mark.parametrize("op, cause", ACROSS)
def test_formerly_ruleless_ops_across_the_batch_dimension_are_refused(op, cause):
    x = torch.randn(B, T, D, requires_grad=True)
    with monitor(x), pytest.raises(SampleMixingError) as err:
        op(x)
    msg = str(err.value)
    assert "samples are mixed" in msg and cause in msg and "privacy_units" in msg, msg


def test_module_layers_keep_the_batch_dimension():
    enc = nn.TransformerEncoderLayer(D, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    gru_free = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Dropout(0.1))
    x = torch.randn(B, T, D)
    with monitor(x) as m:
        assert m.place(enc(x)) == (0, 1)
        assert m.place(gru_free(x)) == (0, 1)
        assert m.place(F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])) == (0, 1)


def test_mixing_under_no_grad_is_refused_when_it_meets_per_sample_values():
    x = torch.randn(B, T, D)
    buf = torch.zeros(T, D)
    with monitor(x):
        with torch.no_grad():
            buf.mul_(0.9).add_(0.1 * x.mean(0))   # batch statistics for a buffer: BufferWatch's business
            stats = x.mean(0)
        with pytest.raises(SampleMixingError, match="mean along dim 0, the batch dimension .under torch.no_grad"):
            x - stats                             # a detached batch normaliser: mixing


def test_mixing_a_tensor_without_gradient_is_refused_when_it_enters_the_model():
    x, fc = torch.randn(6, D), nn.Linear(D, 3)   # a raw input: no gradient of its own
    with MixingMonitor([x], 6, batch_dims=[0], strict=True):
        tail = x[4:] + x[:1]                      # held: only rows beyond the probe are mixed
        h = torch.cat([x[:4], tail])
        with pytest.raises(SampleMixingError, match=r"slices the batch dimension \(dim 0\) as \[4:\].*without grad"):
            fc(h)


def test_token_routing_by_batch_derived_indices_loses_the_position_without_refusing():
    """A mixture of experts dispatches the rows of (B*T, d) by indices computed from the batch (HF
    Mixtral: hidden[top_x], index_add_): the rows' owners are unknown, not refused. The same index
    along the plain batch dimension, or a constant one along the token rows, is refused."""
    x = torch.randn(B, T, D, requires_grad=True)
    with monitor(x) as m:
        tokens = x.reshape(B * T, D)
        scores = tokens.sum(-1)
        top_x = torch.where(scores > 0)[0]
        routed = tokens[top_x]
        assert m.place(routed) is None
        out = torch.zeros_like(tokens).index_add_(0, top_x, routed * 2)
        assert m.place(out) is None
        with pytest.raises(SampleMixingError, match="not arange"):
            tokens[torch.tensor([0, 5, 7])]
        with pytest.raises(SampleMixingError, match="not arange"):
            x[torch.where(x[:, 0, 0] > -10)[0].flip(0)]
