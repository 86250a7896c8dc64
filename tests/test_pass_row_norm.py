"""Row normalisations and the ``inf * decay`` fill (torchscale's RetNet, issue 10).

torchscale builds ``exp(masked_fill(i - j, future, inf) * decay)``, divides the mask by
the square root of its row sums and the decayed scores by their (detached) absolute
row sums clamped at 1.  Those row sums depend on (b, h, i) only: the rewrite computes
them with decay_attn on a column of ones (O(T)) and scales q by them.  ``inf * decay``
is ``-inf`` only for a negative decay: the rewritten graph checks ``decay < 0`` at run
time and otherwise runs the original computation.

Each spelling here is written the way such code is written, not copied from any
project; the near misses are the ways a row statistic can go wrong."""
import pytest
import torch
from torch._dynamo.utils import counters

import leet_compile


def _decay_mask(T, log_decay, dtype, fill="inf"):
    """torchscale's form: +inf above the diagonal, times a (negative) log decay; or the
    same mask with a where (whose gradient w.r.t. the decay is finite: inf * decay's
    is nan in eager)."""
    n = torch.arange(T).to(dtype)
    future = ~torch.tril(torch.ones(T, T, dtype=dtype)).bool()
    d = n[:, None] - n[None, :]
    if fill == "where":
        return torch.where(future, 0.0, torch.exp(d.clamp(min=0) * log_decay[:, None, None]))
    d = torch.masked_fill(d, future, float("inf"))
    return torch.nan_to_num(torch.exp(d * log_decay[:, None, None]))


class RowNormalised(torch.nn.Module):
    """mask / sqrt(rowsum(mask)), then scores / clamp(|rowsum(scores)|, 1)."""

    def __init__(self, heads=3, detach=True, sqrt=True, learn=False, fill="inf"):
        super().__init__()
        self.fill = fill
        decay = torch.log(1 - 2.0 ** (-2 - torch.arange(heads, dtype=torch.float64)))
        if learn:
            self.decay = torch.nn.Parameter(decay)
        else:
            self.register_buffer("decay", decay)
        self.detach, self.sqrt = detach, sqrt

    def forward(self, q, k, v):
        mask = _decay_mask(q.shape[-2], self.decay, q.dtype, self.fill)
        rows = mask.sum(dim=-1, keepdim=True)
        mask = mask / (rows.sqrt() if self.sqrt else rows)
        s = (q @ k.transpose(-1, -2)) * mask
        norm = (s.detach() if self.detach else s).sum(dim=-1, keepdim=True).abs().clamp(min=1)
        return (s / norm) @ v


def _inputs(T=13, B=2, H=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, 4 if i < 2 else 5, generator=g, dtype=dtype) for i in range(3))


def _compile(model, dynamic=False):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend="leet", dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("variant", ["torchscale", "no_detach", "no_sqrt"])
def test_row_normalised_retention_is_rewritten(variant, dynamic):
    model = RowNormalised(detach=variant != "no_detach", sqrt=variant != "no_sqrt")
    q, k, v = _inputs()
    out = _compile(model, dynamic)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1, str(leet_compile.explain(model, q, k, v))
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fill", ["inf", "where"])
@pytest.mark.parametrize("detach", [True, False])
def test_row_normalised_gradients_match_eager(detach, fill):
    """Gradients of q, k, v and of a learned decay (the detached row sum passes none).
    With the inf fill eager's decay gradient is nan (d(inf * decay) = inf, times 0);
    the rewrite's is the true one: that of the same mask written with a where."""
    model = RowNormalised(detach=detach, learn=True, fill=fill)
    q, k, v = (x.requires_grad_() for x in _inputs(seed=1))
    w = torch.randn(2, 3, 13, 5, dtype=torch.float64)
    compiled = _compile(model)
    (compiled(q, k, v) * w).sum().backward()
    assert counters["leet"]["decay_attn_rewrites"] == 1
    got = [x.grad.clone() for x in (q, k, v, model.decay)]
    for x in (q, k, v, model.decay):
        x.grad = None
    model.fill = "where"
    (model(q, k, v) * w).sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad, model.decay.grad)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("decay", [[-0.1, 0.0, -0.5], [-0.1, 0.2, -0.5], [-0.1, float("-inf"), -0.5]],
                         ids=["zero", "growing", "minus_inf"])
def test_inf_times_decay_falls_back_when_not_negative(decay):
    """decay < 0 and finite is checked at run time; any other value runs eager's graph."""
    model = RowNormalised()
    q, k, v = _inputs(seed=2)
    compiled = _compile(model)
    compiled(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1
    model.decay.copy_(torch.tensor(decay, dtype=torch.float64))  # the same compiled graph
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-10, atol=1e-10, equal_nan=True)
    report = leet_compile.explain(model, q, k, v)
    assert "decay < 0 and finite" in report.rewrites[0].decay


# ---------------------------------------------------------------- near misses


def _mask(q):
    return _decay_mask(q.shape[-2], torch.tensor([-0.2, -0.3, -0.4], dtype=q.dtype), q.dtype)


def column_sums(q, k, v):  # sums over the query positions: not a row statistic
    m = _mask(q)
    return ((q @ k.mT) * (m / m.sum(dim=-2, keepdim=True))) @ v


def partial_row_sums(q, k, v):  # a sum over half the keys only
    m = _mask(q)
    half = q.shape[-2] // 2
    return ((q @ k.mT) * (m / (m[..., :half].sum(dim=-1, keepdim=True) + 1))) @ v


def abs_scores_row_sums(q, k, v):  # torchscale's GitHub head: a sum of |scores|, not bilinear
    s = (q @ k.mT) * _mask(q)
    return (s / s.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1, max=5e4)) @ v


def row_sum_minus_one(q, k, v):  # row 0 sums to 1: 1 - 1 = 0, a division by zero in eager
    m = _mask(q)
    return ((q @ k.mT) * (m / (m.sum(dim=-1, keepdim=True) - 1))) @ v


def row_sum_in_exponent(q, k, v):  # a row statistic inside the decay: not a decay mask
    m = _mask(q)
    return ((q @ k.mT) * (m * torch.exp(-m.sum(dim=-1, keepdim=True)))) @ v


def row_sum_added(q, k, v):  # the mask plus a row statistic: not zero above the diagonal
    m = _mask(q)
    return ((q @ k.mT) * (m + m.sum(dim=-1, keepdim=True))) @ v


def other_scores_row_sums(q, k, v):  # normalised by the row sums of other scores
    s = (q @ k.mT) * _mask(q)
    other = ((k @ q.mT) * _mask(q)).sum(dim=-1, keepdim=True).abs().clamp(min=1)
    return (s / other) @ v


def transposed_row_sums(q, k, v):  # the row sums of the transposed mask (column sums again)
    m = _mask(q)
    return ((q @ k.mT) * (m / m.mT.sum(dim=-1, keepdim=True).mT)) @ v


NEAR_MISSES = [column_sums, partial_row_sums, abs_scores_row_sums, row_sum_minus_one, row_sum_in_exponent,
               row_sum_added, other_scores_row_sums, transposed_row_sums]


@pytest.mark.parametrize("fn", NEAR_MISSES, ids=[f.__name__ for f in NEAR_MISSES])
def test_row_statistic_near_miss_is_left_alone(fn):
    q, k, v = _inputs(seed=3)
    out = _compile(fn)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 0, str(leet_compile.explain(fn, q, k, v))
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-10, atol=1e-10, equal_nan=True)


def test_low_precision_row_sums_are_left_alone():
    """A bf16 mask normalised in bf16 inside a float32 model: eager's weights carry bf16
    rounding far above float32's, so the rewrite would change the result."""
    def fn(q, k, v):
        m = _mask(q).to(torch.bfloat16)
        m = (m / m.sum(dim=-1, keepdim=True).sqrt()).float()
        return ((q @ k.mT) * m) @ v

    q, k, v = _inputs(seed=4, dtype=torch.float32)
    _compile(fn)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 0


def test_row_sums_are_computed_in_float64_on_the_inputs_as_they_are():
    """In a bf16 model: the mask's row sums (positive terms) and the scores' signed row
    sum (it may cancel) in float64 (a float64 column of ones), q and k passed to the
    operator in bf16 (no float64 copies), the per-row factor 1 / sqrt(mask sum) applied
    to the scores' sum, not folded into q."""
    from pass_fuzz import trace  # (pytest puts tests/ on sys.path)
    from leet_compile.passes import rewrite_decay_attention

    def fn(q, k, v, decay):
        m = _decay_mask(q.shape[-2], decay, q.dtype)
        m = m / m.sum(dim=-1, keepdim=True).sqrt()
        s = (q @ k.mT) * m
        return (s / s.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)) @ v

    decay = torch.tensor([-0.1, -0.2, -0.3], dtype=torch.bfloat16)
    gm = trace(fn, [*_inputs(dtype=torch.bfloat16), decay])
    assert rewrite_decay_attention(gm).rewrites
    nodes = [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]  # (in torch.cond)
    sums = [n for n in nodes if n.target is torch.ops.leet.decay_attn.default
            and n.args[2].meta["val"].shape[-1] == 1]  # v: a column of ones
    assert len(sums) == 2
    for n in sums:
        q, k, ones = (a.meta["val"] for a in n.args[:3])
        assert ones.dtype == torch.float64 and q.dtype == k.dtype == torch.bfloat16, (q.dtype, k.dtype, ones.dtype)


def test_float32_mask_in_a_float64_signed_row_sum_is_left_alone():
    """A float32 mask times float64 scores, normalised by their signed row sum (fuzz seed
    57625): eager's weights carry float32 rounding, which the cancelling sum amplifies
    beyond any float64 tolerance; the mask's own rounding is fine elsewhere (float32 is
    the operator's accumulation), not inside a signed row sum."""
    def mask(q):  # float32
        n = torch.arange(q.shape[-2], dtype=torch.float32)
        d = n[:, None] - n[None, :]
        return torch.where(d >= 0, torch.exp(-0.1 * d.clamp(min=0)), 0.0)

    def fn(q, k, v):
        s = (q @ k.mT) * mask(q)
        return (s / s.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)) @ v

    def plain(q, k, v):
        return ((q @ k.mT) * mask(q)) @ v

    q, k, v = _inputs(seed=5)  # float64
    out = _compile(fn)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 0, str(leet_compile.explain(fn, q, k, v))
    torch.testing.assert_close(out, fn(q, k, v))
    # the same mask without the row sum is rewritten
    _compile(plain)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1, str(leet_compile.explain(plain, q, k, v))


def test_guarded_rewrite_shares_values_the_rest_of_the_model_reads():
    """torchscale's RetNetRelPos builds one position tensor for the mask and for the
    rotary angles of q and k: the fallback branch must not take it away from them."""
    class SharedPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("decay", torch.tensor([-0.1, -0.2, -0.3], dtype=torch.float64))

        def forward(self, q, k, v):
            T = q.shape[-2]
            n = torch.arange(T).to(self.decay)
            rot = torch.cos(n[:, None] * 0.1)  # read by q and k, and by the mask below
            q, k = q * rot, k * rot
            future = ~torch.tril(torch.ones(T, T, dtype=q.dtype)).bool()
            d = torch.masked_fill(n[:, None] - n[None, :], future, float("inf"))
            mask = torch.nan_to_num(torch.exp(d * self.decay[:, None, None]))
            return ((q @ k.mT) * mask) @ v

    model = SharedPositions()
    q, k, v = _inputs(seed=5)
    out = _compile(model)(q, k, v)
    assert counters["leet"]["decay_attn_rewrites"] == 1
    assert counters["leet"]["internal_errors"] == 0
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-10, atol=1e-10)
