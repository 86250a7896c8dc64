"""Chunked models (fla's naive_chunk_simple_gla: one site per chunk, a Python loop
unrolled by dynamo) in inference: the chunks' sites share one run-time check, one
torch.cond and one decay_attn call over every chunk (passes/rewrite.py _chunk_batched,
passes/guard.py merge_guards), and the result still equals eager's whichever branch
runs, and where an in-place write between the chunks forbids sharing."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from pass_fuzz import check_fn, make_inputs, trace  # noqa: E402

from leet_compile.passes import rewrite_decay_attention  # noqa: E402
from leet_compile.passes.guard import guarded_sites  # noqa: E402

CL = 4  # chunk length


def _chunks(q, k, v, write):
    B, H, T, D = q.shape
    N = T // CL
    qc = q.clone().reshape(B, H, N, CL, D)
    kc, vc = (x.reshape(B, H, N, CL, D) for x in (k, v))
    decay = (torch.nn.functional.logsigmoid(k.mean(-1) + 1.0) / 4).reshape(B, H, N, CL).cumsum(-1)
    L_mask = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).tril().exp().tril()
    o = torch.zeros_like(vc)
    for n in range(N):
        attn = qc[:, :, n] @ kc[:, :, n].transpose(-1, -2) * L_mask[:, :, n]
        o[:, :, n] = attn @ vc[:, :, n]
        if write and n + 1 < N:
            qc[:, :, n + 1].mul_(2.0)  # the next chunk's queries change after this chunk
    return o.reshape(B, H, T, D)


def _chunked(q, k, v):
    return _chunks(q, k, v, False)


def _chunked_with_writes(q, k, v):
    return _chunks(q, k, v, True)


def _all_nodes(gm):
    for m in gm.modules():
        if isinstance(m, torch.fx.GraphModule):
            yield from m.graph.nodes


def _calls(gm):
    return sum(n.op == "call_function" and n.target is torch.ops.leet.decay_attn.default for n in _all_nodes(gm))


def test_chunks_share_one_check_one_cond_one_call():
    inputs = make_inputs(2, 3, 16, 4, dtype=torch.float64, seed=1)
    gm = trace(_chunked, inputs)
    report = rewrite_decay_attention(gm)
    assert len(report.rewrites) == 4, report
    assert len(guarded_sites(gm)) == 1
    assert _calls(gm) == 1
    # the chunks' masks are computed in the slow branch only
    assert not any(n.op == "call_function" and n.target is torch.ops.aten.tril.default for n in gm.graph.nodes)


def test_chunks_fast_and_slow_branches_equal_eager():
    inputs = make_inputs(2, 3, 16, 4, dtype=torch.float64, seed=1)
    res = check_fn(_chunked, inputs, rtol=1e-6)
    assert res.ok and res.rewrites == 4, (res.kind, res.failure, res.reasons)
    # -inf in one chunk's keys: its decay is -inf, the check fails, every chunk takes the
    # original computation (nan where eager has nan)
    bad = [x.clone() for x in inputs]
    bad[1][1, 2, 13, 0] = float("-inf")
    gm = trace(_chunked, bad)
    rewrite_decay_attention(gm)
    out, ref = gm(*[x.clone() for x in bad]), _chunked(*[x.clone() for x in bad])
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=1e-9, atol=1e-12)


def test_in_place_write_between_chunks_is_not_shared():
    inputs = make_inputs(2, 3, 16, 4, dtype=torch.float64, seed=2)
    res = check_fn(_chunked_with_writes, inputs, rtol=1e-6)
    assert res.ok, (res.kind, res.failure, res.reasons)
    gm = trace(_chunked_with_writes, inputs)
    assert len(rewrite_decay_attention(gm).rewrites) == 4
    assert _calls(gm) == 4 and len(guarded_sites(gm)) == 4  # nothing read before a write is reused after it
