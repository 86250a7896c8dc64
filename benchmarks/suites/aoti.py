"""aoti: AOTInductor packages of a RetNet-style block, naive vs rewritten into leet.decay_attn."""
import tempfile

import torch

from harness import Case, suite


class RetNetBlock(torch.nn.Module):
    """Multi-scale retention (parallel form) as public RetNet code writes it:
    gamma_h = 1 - 2^(-5 - h), D = tril(gamma ** (i - j)), ((q k^T) * D) v."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out_proj = torch.nn.Linear(dim, dim, bias=False)
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32)), persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2) for p in self.qkv)
        index = torch.arange(T, device=x.device)
        mask = torch.tril(self.gamma[:, None, None] ** (index[:, None] - index[None, :]))
        o = ((q @ k.transpose(-1, -2)) * self.head_dim**-0.5 * mask) @ v
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


def prepare(params, args):
    """Exports the block twice (as written; through leet_compile.export) with a dynamic T and
    compiles each into one AOTInductor package that serves every T."""
    import time

    import leet_compile

    torch.manual_seed(0)
    model = RetNetBlock(params["dim"], params["heads"]).eval()
    example = (torch.randn(params["batch"], 64, params["dim"]),)
    xs = args.x or ([64, 100] if args.smoke else [1024, 4096])
    dynamic = ({1: torch.export.Dim("T", min=2, max=max(max(xs), 65))},)
    programs = {"naive package": torch.export.export(model, example, dynamic_shapes=dynamic),
                "leet package": leet_compile.export(model, example, dynamic_shapes=dynamic)}
    # the op may sit in the fast branch of a run-time check (torch.cond): count every subgraph
    n_ops = sum(n.target is torch.ops.leet.decay_attn.default
                for m in programs["leet package"].graph_module.modules() if isinstance(m, torch.fx.GraphModule)
                for n in m.graph.nodes)
    if n_ops != 1:
        raise RuntimeError(f"expected one leet.decay_attn in the exported graph, found {n_ops}")
    runners, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ep in programs.items():
            t0 = time.perf_counter()
            print(f"   compiling the {name} (AOTInductor; a minute or more)", flush=True)
            path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/{name.split()[0]}.pt2")
            compile_s[name] = time.perf_counter() - t0
            runners[name] = leet_compile.load_package(path)
    return {"model": model, "runners": runners, "_record": {"compile_s": compile_s}}


@suite("aoti", x_name="T", x_vals=[1024, 4096], smoke_x_vals=[64, 100],
       params=dict(batch=1, dim=512, heads=8), smoke_params=dict(dim=64, heads=4), baseline="leet package",
       prepare=prepare)
def aoti(T, batch, dim, heads, model, runners):
    """AOTInductor package of a RetNet block (dim 512, 8 heads): packaged as written vs after leet_compile.export; one package serves every T"""
    x = torch.randn(batch, T, dim)
    with torch.no_grad():
        err = (runners["leet package"](x) - model(x)).abs().max().item()
    fns = {}
    for name, run in runners.items():
        def call(run=run):
            with torch.no_grad():
                return run(x)
        fns[name] = call
    return Case(fns, info={"leet package": {"max_abs_err_vs_eager": err}})
