"""leet_compile.export / rewrite_exported_program: a RetNet-style block written the
way public RetNet code writes it is exported with its retention rewritten into
leet.decay_attn, for every sequence length in the declared range."""
import sys

import pytest
import torch

import leet_compile


class RetNetBlock(torch.nn.Module):
    """Multi-scale retention, parallel form, as in public RetNet code: per-head
    gamma = 1 - 2^(-5 - h), mask D[h, i, j] = gamma_h^(i - j) below the diagonal, built
    from arange differences with pow and tril, then ((q k^T) * D) v."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = torch.nn.Linear(dim, dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, dim, bias=False)
        self.v_proj = torch.nn.Linear(dim, dim, bias=False)
        self.g_proj = torch.nn.Linear(dim, dim, bias=False)
        self.out_proj = torch.nn.Linear(dim, dim, bias=False)
        self.group_norm = torch.nn.GroupNorm(heads, dim)
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32)), persistent=False)

    def decay_mask(self, T):
        index = torch.arange(T, device=self.gamma.device)
        distance = index[:, None] - index[None, :]  # i - j
        return torch.tril(self.gamma[:, None, None] ** distance)  # [H, T, T]

    def forward(self, x):
        B, T, D = x.shape
        H, dh = self.heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, dh).transpose(1, 2) * dh**-0.5
        v = self.v_proj(x).view(B, T, H, dh).transpose(1, 2)
        retention = (q @ k.transpose(-1, -2)) * self.decay_mask(T)
        o = (retention @ v).transpose(1, 2).reshape(B * T, D)
        o = self.group_norm(o).view(B, T, D)
        return self.out_proj(torch.nn.functional.silu(self.g_proj(x)) * o)


class NotCausal(RetNetBlock):
    """A mask that is not causal (full gamma^|i-j|): must not be rewritten."""

    def decay_mask(self, T):
        index = torch.arange(T, device=self.gamma.device)
        return self.gamma[:, None, None] ** (index[:, None] - index[None, :]).abs()


def count_decay_attn(ep):
    """decay_attn calls in the program, guarded branches (cond subgraphs) included."""
    return sum(n.target is torch.ops.leet.decay_attn.default
               for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)


def dynamic_T(max_T=4096):
    return ({1: torch.export.Dim("T", min=2, max=max_T)},)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return RetNetBlock().eval()


@pytest.mark.parametrize("strict", [False, True])
def test_export_rewrites_retention_for_every_length(model, strict):
    ep = leet_compile.export(model, (torch.randn(2, 64, 64),), dynamic_shapes=dynamic_T(), strict=strict)
    assert count_decay_attn(ep) == 1
    assert "aten.tril" not in str(ep.graph)  # the mask is gone
    assert len(ep.graph_module.meta["leet_compile.rewrite_report"].rewrites) == 1
    run = ep.module()
    for T in (2, 37, 256):
        x = torch.randn(2, T, 64)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-5)


def test_rewrite_exported_program_leaves_input_alone(model):
    ep = torch.export.export(model, (torch.randn(1, 16, 64),), dynamic_shapes=dynamic_T())
    before = str(ep.graph)
    rewritten = leet_compile.rewrite_exported_program(ep)
    assert count_decay_attn(rewritten) == 1
    assert str(ep.graph) == before and count_decay_attn(ep) == 0
    x = torch.randn(1, 50, 64)
    with torch.no_grad():
        torch.testing.assert_close(rewritten.module()(x), ep.module()(x), rtol=1e-4, atol=1e-5)


def test_unproven_mask_is_left_alone():
    torch.manual_seed(0)
    model = NotCausal().eval()
    ep = leet_compile.export(model, (torch.randn(1, 16, 64),), dynamic_shapes=dynamic_T())
    assert count_decay_attn(ep) == 0
    x = torch.randn(1, 24, 64)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip(model, tmp_path):
    """The rewritten program serializes (torch.export.save) and loads back."""
    ep = leet_compile.export(model, (torch.randn(1, 16, 64),), dynamic_shapes=dynamic_T())
    torch.export.save(ep, tmp_path / "retnet.pt2")
    loaded = torch.export.load(tmp_path / "retnet.pt2")
    assert count_decay_attn(loaded) == 1
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_import_stays_cheap():
    """`import leet_compile` does not import the export helpers (or torch.export work)."""
    import subprocess

    code = "import sys, leet_compile; assert 'leet_compile.deploy' not in sys.modules; leet_compile.export"
    subprocess.run([sys.executable, "-c", code], check=True)
