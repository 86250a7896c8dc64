"""Greedy generation with a small RetNet-style language model and the decoding step.

The prompt is prefilled with ``leet_compile.decay_attn(..., output_final_state=True)``
(one call per layer), then every new token costs one ``decay_attn_step_`` per layer:
O(K V) per head, whatever the context length. The decode loop runs in eager mode and
under ``torch.compile(backend="leet")`` (``"inductor"`` when the leet backend is not
installed), and both must produce the tokens of the quadratic reference: the same
model computing masked retention the O(T^2) way over the whole sequence for every
token, in float64.

    python examples/generate.py                       # tiny_retnet config, 32 tokens
    python examples/generate.py --tokens 8 --prompt-len 12 --threads 1
    python examples/generate.py --config examples/configs/tiny_retnet.json --batch 4

The weights are random (seeded): the point is the mechanics and the speed, not the text.
"""
import argparse
import copy
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import leet_compile

HERE = os.path.dirname(os.path.abspath(__file__))


def naive_retention(q, k, v, log_decay, scale):
    """((Q K^T) * D) V with D[i, j] = gamma_h^(i - j) for j <= i, else 0: the O(T^2) form."""
    T = q.shape[2]
    i = torch.arange(T, device=q.device)
    dist = (i[:, None] - i[None, :]).to(q.dtype)                    # [T, T]
    D = torch.exp(log_decay.to(q.dtype)[:, None, None] * dist)        # [H, T, T]
    D = D.masked_fill(i[None, :] > i[:, None], 0.0)
    return ((q @ k.transpose(-1, -2)) * scale * D) @ v


class Retention(nn.Module):
    """Multi-scale retention: per-head decay gamma_h = 1 - 2^(-5 - h), gated output."""

    def __init__(self, d_model, n_heads, key_dim, value_dim):
        super().__init__()
        self.H, self.K, self.V = n_heads, key_dim, value_dim
        self.wq = nn.Linear(d_model, n_heads * key_dim, bias=False)
        self.wk = nn.Linear(d_model, n_heads * key_dim, bias=False)
        self.wv = nn.Linear(d_model, n_heads * value_dim, bias=False)
        self.wg = nn.Linear(d_model, n_heads * value_dim, bias=False)
        self.wo = nn.Linear(n_heads * value_dim, d_model, bias=False)
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_decay", gamma.log().float())

    def forward(self, x, mode, state=None):
        """x [B, T, d]. mode: "quadratic" (reference), "prefill" (returns the state) or
        "step" (T == 1; updates `state` [B, H, K, V] in place)."""
        B, T, _ = x.shape
        H, K, V, scale = self.H, self.K, self.V, self.K**-0.5
        q = self.wq(x).view(B, T, H, K).transpose(1, 2)  # [B, H, T, K], a strided view
        k = self.wk(x).view(B, T, H, K).transpose(1, 2)
        v = self.wv(x).view(B, T, H, V).transpose(1, 2)
        if mode == "quadratic":
            o = naive_retention(q, k, v, self.log_decay, scale)
        elif mode == "prefill":
            o, state = leet_compile.decay_attn(q, k, v, self.log_decay, scale=scale, output_final_state=True)
        else:
            o = leet_compile.decay_attn_step_(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.log_decay, state, scale=scale)
            o = o.unsqueeze(2)
        o = F.layer_norm(o.transpose(1, 2), (V,))  # per-head normalisation, [B, T, H, V]
        o = o.reshape(B, T, H * V) * F.silu(self.wg(x))
        return self.wo(o), state


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ret = Retention(d, cfg["n_heads"], cfg["key_dim"], cfg["value_dim"])
        self.ffn = nn.Sequential(nn.Linear(d, cfg["ffn_dim"]), nn.GELU(), nn.Linear(cfg["ffn_dim"], d))

    def forward(self, x, mode, state=None):
        h, state = self.ret(self.ln1(x), mode, state)
        x = x + h
        return x + self.ffn(self.ln2(x)), state


class RetNetLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.ln_f = nn.LayerNorm(cfg["d_model"])
        self.head = nn.Linear(cfg["d_model"], cfg["vocab_size"], bias=False)

    def _run(self, tokens, mode, states):
        x = self.embed(tokens)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, mode, state)
            new_states.append(state)
        return self.head(self.ln_f(x)), new_states

    def forward_quadratic(self, tokens):
        """Logits [B, T, vocab] for the whole sequence, retention the O(T^2) way."""
        return self._run(tokens, "quadratic", [None] * len(self.blocks))[0]

    def prefill(self, tokens):
        """Logits of the last prompt position [B, vocab] and the per-layer states."""
        logits, states = self._run(tokens, "prefill", [None] * len(self.blocks))
        return logits[:, -1], states

    def step(self, token, states):
        """Logits [B, vocab] for one new token [B]; updates `states` in place."""
        return self._run(token[:, None], "step", states)[0][:, 0]


@torch.no_grad()
def generate_reference(model, prompt, n):
    """Greedy tokens of the quadratic model, recomputing the whole sequence per token."""
    seq = prompt
    for _ in range(n):
        nxt = model.forward_quadratic(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[:, prompt.shape[1]:]


@torch.no_grad()
def generate(model, step_fn, prompt, n):
    """Greedy tokens: prefill the prompt, then one step per token. Returns (tokens, seconds)."""
    start = time.perf_counter()
    logits, states = model.prefill(prompt)
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1)
        out.append(nxt)
        logits = step_fn(nxt, states)
    return torch.stack(out, 1), time.perf_counter() - start


def compile_backend():
    """"leet" when its backend is installed and importable, else "inductor" (with the reason)."""
    try:
        torch._dynamo.lookup_backend("leet")
        return "leet", None
    except Exception as e:  # the entry point exists but leet_compile.backend may not yet
        return "inductor", f"{type(e).__name__}: {e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "configs", "tiny_retnet.json"))
    p.add_argument("--prompt", default="Exponentially decaying attention is a recurrence. ")
    p.add_argument("--prompt-len", type=int, default=None, help="repeat/cut the prompt to this many tokens")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest for this tiny model on a busy machine)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with open(args.config) as f:
        cfg = json.load(f)
    torch.manual_seed(cfg.get("seed", 0))
    model = RetNetLM(cfg).eval()

    ids = list(args.prompt.encode())
    if args.prompt_len is not None:
        ids = (ids * (args.prompt_len // len(ids) + 1))[: args.prompt_len]
    prompt = torch.tensor(ids).repeat(args.batch, 1)
    if args.batch > 1:  # different prompts per row: rotate each row
        prompt = torch.stack([row.roll(i) for i, row in enumerate(prompt)])
    B, n = args.batch, args.tokens
    print(f"config {os.path.basename(args.config)}: {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
          f"K={cfg['key_dim']} V={cfg['value_dim']}; batch {B}, prompt {prompt.shape[1]} tokens, generating {n}")

    start = time.perf_counter()
    ref = generate_reference(copy.deepcopy(model).double(), prompt, n)
    t_ref = time.perf_counter() - start

    eager, t_eager = generate(model, model.step, prompt, n)

    backend, why = compile_backend()
    if why is not None:
        print(f'torch.compile backend "leet" is not available ({why}); using backend="inductor"')
    step_c = torch.compile(model.step, backend=backend, fullgraph=True)
    start = time.perf_counter()
    generate(model, step_c, prompt, 1)  # compiles (warm-up, on its own states)
    t_compile = time.perf_counter() - start
    compiled, t_comp = generate(model, step_c, prompt, n)

    rate = lambda t: B * n / t  # noqa: E731
    print(f"{'quadratic reference (float64, O(T^2) per token)':<50} {rate(t_ref):9.1f} tokens/s")
    print(f"{'eager: prefill + decay_attn_step_':<50} {rate(t_eager):9.1f} tokens/s")
    print(f"{f'torch.compile(backend={backend!r}) step loop':<50} {rate(t_comp):9.1f} tokens/s"
          f"  (compiled in {t_compile:.1f} s)")
    print("generated ids (row 0):", ref[0].tolist())
    ok = torch.equal(eager, ref) and torch.equal(compiled, ref)
    if ok:
        print(f"eager and compiled tokens match the quadratic reference ({B} x {n} tokens)")
    else:
        print("MISMATCH: eager", eager[0].tolist(), "compiled", compiled[0].tolist())
        raise SystemExit(1)


if __name__ == "__main__":
    main()
