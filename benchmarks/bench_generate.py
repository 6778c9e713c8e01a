"""Generation with funcnet's KV cache against recomputing the window, and against torch.

Model: a character-level GPT as nanoGPT builds it: vocab 65, 128 features, learned positions
(context 1024), 4 pre-LayerNorm blocks of causal self-attention (4 heads) and a GELU MLP (512),
a final LayerNorm and the head; float32, batch 1. Measured, side by side in one run:

* (a) one jitted ``fn.decode_step`` on a 1024-long cache holding 16, 128, 512 and 1000 tokens
  (filled by ``fn.prefill`` of a prompt that long; the step is pure, so it is timed on the same
  cache again and again): the cost of a token at each position. Twice: as a pure call, which
  writes a whole new cache (4 MiB at context 1024) every call, and with the cache donated
  (``jax.jit(..., donate_argnums=1)``, the returned cache fed back with its position unchanged),
  updated in place as in a decoding loop or ``generate``'s scan;
* (b) recomputing instead: jitted ``net.apply(params, window)[:, -1]`` on a window of 1024
  tokens, the per-token cost of generating without a cache at full context (target: decode_step
  at least 20x faster);
* (c) ``fn.generate(net, params, prompt (1, 16), steps=256, key=..., top_k=1)`` end to end, after a
  compiling call (whose time is reported on its own); and its compiled program alone
  (``funcnet.decoding._generate``, private), to show what its per-call checks in Python cost;
* (d) the same network in torch (skipped with a note if torch is absent), its weights copied from
  funcnet's params and checked to give the same logits: (d1) nanoGPT's ``generate``, recomputing
  the whole window every token (``model(idx[:, -1024:])[:, -1]``), and (d2) a KV-cached loop
  written here (each layer's keys and values, appended every step); both greedy, in
  ``torch.no_grad()``, eager, ``torch.set_num_threads`` = the cores this process may use
  (``--torch-threads``). Their per-token times at the positions of (a) and on the 1024 window of
  (b) too.

Every group of timings is taken in alternation (round-robin) between the systems; medians. One
table, ratios against torch's KV-cached loop (for a per-token row, torch's cached step at the same
position; for the recompute rows, torch's cached step at the last position of (a)).

    python benchmarks/bench_generate.py            # the table (a few minutes on 2 cores)
    python benchmarks/bench_generate.py --quick    # context 64, 1 layer, 16 steps: check it runs
    python benchmarks/bench_generate.py --rounds 3 # fewer rounds
    python benchmarks/bench_generate.py --torch-threads 1  # on a busy machine: torch's threads spin
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, table

import funcnet as fn
from funcnet.decoding import _generate

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # the torch peer is optional
    torch = None

VOCAB, FEATURES, HEADS, HIDDEN = 65, 128, 4, 512


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- funcnet ------------------------------------------------------------------------------------


def gpt(context: int, layers: int) -> fn.Layer:
    """nanoGPT's GPT in funcnet (pre-LN blocks, learned positions, biases)."""
    blocks = []
    for _ in range(layers):
        blocks += [
            fn.residual(fn.LayerNorm(), fn.MultiHeadAttention(HEADS, is_causal=True)),
            fn.residual(
                fn.LayerNorm(),
                fn.Dense(HIDDEN, fn.gelu, w_init=fn.glorot_normal, b_init=fn.zeros),
                fn.Dense(FEATURES, fn.linear, w_init=fn.glorot_normal, b_init=fn.zeros),
            ),
        ]
    return fn.serial(
        fn.Embedding(VOCAB, FEATURES, w_init=fn.normal(0.02)),
        fn.PositionalEmbedding(context),
        *blocks,
        fn.LayerNorm(),
        fn.Dense(VOCAB, fn.linear),
    )


# --- torch --------------------------------------------------------------------------------------

if torch is not None:

    class _Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(FEATURES, FEATURES) for _ in range(4))

        def forward(self, x: torch.Tensor, past: tuple | None) -> tuple[torch.Tensor, tuple]:
            B, T, D = x.shape
            q, k, v = (p(x).view(B, T, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
            if past is not None:  # one new position after the cached ones: it sees them all
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
            return self.o(y.transpose(1, 2).reshape(B, T, D)), (k, v)

    class _Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(FEATURES), _Attention(), nn.LayerNorm(FEATURES)
            self.fc, self.proj = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, FEATURES)

        def forward(self, x: torch.Tensor, past: tuple | None) -> tuple[torch.Tensor, tuple]:
            y, kv = self.attn(self.ln_1(x), past)
            x = x + y
            return x + self.proj(F.gelu(self.fc(self.ln_2(x)))), kv

    class TorchGPT(nn.Module):
        """The same network; ``forward(idx, cache=None)`` returns the logits and each layer's
        keys and values (``cache``: those of the positions before ``idx``, which is then one token)."""

        def __init__(self, context: int, layers: int) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, FEATURES), nn.Embedding(context, FEATURES)
            self.h = nn.ModuleList(_Block() for _ in range(layers))
            self.ln_f, self.head = nn.LayerNorm(FEATURES), nn.Linear(FEATURES, VOCAB)

        def forward(self, idx: torch.Tensor, cache: list | None = None) -> tuple[torch.Tensor, list]:
            start = 0 if cache is None else cache[0][0].shape[2]
            positions = torch.arange(start, start + idx.shape[1])
            x = self.wte(idx) + self.wpe(positions)[None]
            new = []
            for i, block in enumerate(self.h):
                x, kv = block(x, None if cache is None else cache[i])
                new.append(kv)
            return self.head(self.ln_f(x)), new

    def torch_from(params: Any, context: int, layers: int) -> TorchGPT:
        """A ``TorchGPT`` holding funcnet's params: a Dense ``W: (in, out)`` is a Linear's
        ``weight.T``, ``B: (1, out)`` its bias; ``W_q, W_k, W_v, W_o`` likewise."""
        model = TorchGPT(context, layers).eval()
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))

        def linear(module: nn.Linear, W: Any, B: Any) -> None:
            module.weight.copy_(t(W).T)
            module.bias.copy_(t(B)[0])

        def norm(module: nn.LayerNorm, p: Any) -> None:
            module.weight.copy_(t(p.gamma))
            module.bias.copy_(t(p.beta))

        with torch.no_grad():
            model.wte.weight.copy_(t(params[0].W))
            model.wpe.weight.copy_(t(params[1].W))
            for i, block in enumerate(model.h):
                (ln_1, a), (ln_2, fc, proj) = params[2 + 2 * i], params[3 + 2 * i]
                norm(block.ln_1, ln_1)
                for module, W, B in (
                    (block.attn.q, a.W_q, a.B_q),
                    (block.attn.k, a.W_k, a.B_k),
                    (block.attn.v, a.W_v, a.B_v),
                    (block.attn.o, a.W_o, a.B_o),
                ):
                    linear(module, W, B)
                norm(block.ln_2, ln_2)
                linear(block.fc, fc.W, fc.B)
                linear(block.proj, proj.W, proj.B)
            norm(model.ln_f, params[-2])
            linear(model.head, params[-1].W, params[-1].B)
        return model

    def torch_recompute(model: TorchGPT, idx: torch.Tensor, steps: int, context: int) -> torch.Tensor:
        """nanoGPT's ``generate``, greedy: the whole (cropped) window again for every token."""
        with torch.no_grad():
            for _ in range(steps):
                logits, _ = model(idx[:, -context:])
                idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx

    def torch_cached(model: TorchGPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy with a KV cache: the prompt once, then one token per step on the cached keys."""
        with torch.no_grad():
            logits, cache = model(idx)
            tokens = [idx]
            for _ in range(steps):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                logits, cache = model(token, cache)
        return torch.cat(tokens, dim=1)


# --- timing -------------------------------------------------------------------------------------


def interleaved(fs: dict[str, Callable[[], Any]], rounds: int, inner: dict[str, int] | None = None) -> dict:
    """Median seconds per call of each thunk, timed in alternation (round-robin) after one warm-up
    call each; each sample is the mean of ``inner[name]`` back-to-back calls (default 1)."""
    inner = inner or {}
    for f in fs.values():
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {name: [] for name in fs}
    for _ in range(rounds):
        for name, f in fs.items():
            n = inner.get(name, 1)
            start = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(f())
            times[name].append((time.perf_counter() - start) / n)
    return {name: float(np.median(t)) for name, t in times.items()}


def _repeats(seconds: float, target: float = 0.02) -> int:
    """Back-to-back calls per sample so that one sample lasts about ``target`` seconds."""
    return max(1, min(200, round(target / max(seconds, 1e-7))))


def _rough(f: Callable[[], Any], calls: int = 3) -> float:
    jax.block_until_ready(f())
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(f())
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="context 64, 1 layer, 16 steps: check that it runs")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per group")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch's threads (default: the cores)")
    args = parser.parse_args()
    context, layers, prompt_length, steps = (64, 1, 8, 16) if args.quick else (1024, 4, 16, 256)
    positions = [8, 60] if args.quick else [16, 128, 512, 1000]
    rounds = args.rounds or (3 if args.quick else 7)
    gen_rounds = args.rounds or (2 if args.quick else 5)
    cores = args.torch_threads or _cores()

    net = gpt(context, layers)
    _, params = net.init(jax.random.key(0), (1, context))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (1, context))
    window = jnp.asarray(ids, jnp.int32)

    have_torch = torch is not None
    if have_torch:
        torch.set_num_threads(cores)
        model = torch_from(params, context, layers)
        with torch.no_grad():
            theirs = model(torch.from_numpy(ids))[0].numpy()
        ours = np.asarray(jax.jit(net.apply)(params, window))
        error, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs)))
        if not error <= 1e-4 * max(1.0, scale):
            raise AssertionError(f"funcnet's and torch's logits differ by {error:.2e} (scale {scale:.2f}).")
        print(
            f"Same logits on a random {context}-token prompt: max |funcnet - torch| = {error:.1e} (scale {scale:.1f})"
        )

    # (a) decode_step at each position, (b) recomputing the window; torch's counterparts.
    step = jax.jit(lambda p, c, t: fn.decode_step(net, p, c, t))

    def same_position(p: Any, c: fn.Cache, t: jax.Array) -> tuple[jax.Array, fn.Cache]:
        logits, new = fn.decode_step(net, p, c, t)
        return logits, fn.Cache(new.layers, c.position)  # the next call writes the same position again

    in_place = jax.jit(same_position, donate_argnums=1)  # as a decoding loop would: no copy of the cache
    prefill = jax.jit(lambda p, c, t: fn.prefill(net, p, c, t))
    recompute = jax.jit(lambda p, w: net.apply(p, w)[:, -1])
    token = jnp.asarray([3], jnp.int32)
    thunks: dict[str, Callable[[], Any]] = {}
    for position in positions:
        cache = fn.init_cache(net, params, 1, context)
        _, cache = prefill(params, cache, window[:, :position])
        ours_step, _ = step(params, cache, token)
        thunks[f"funcnet step {position}"] = lambda cache=cache: step(params, cache, token)[0]
        box = [jax.tree_util.tree_map(jnp.copy, cache)]  # its own copy: donated, replaced every call

        def donated_step(box: list = box) -> Any:
            logits, box[0] = in_place(params, box[0], token)
            return logits

        thunks[f"funcnet in place {position}"] = donated_step
        if have_torch:
            with torch.no_grad():
                _, kv = model(torch.from_numpy(ids[:, :position]))
                theirs_step = model(torch.tensor([[3]]), kv)[0][:, -1].numpy()
            error = float(np.max(np.abs(np.asarray(ours_step) - theirs_step)))
            if not error <= 1e-4 * max(1.0, scale):
                raise AssertionError(f"decode_step at {position}: funcnet and torch differ by {error:.2e}.")

            def torch_step(kv: list = kv) -> Any:
                with torch.no_grad():
                    return model(torch.tensor([[3]]), kv)[0]

            thunks[f"torch step {position}"] = torch_step
    thunks["funcnet recompute"] = lambda: recompute(params, window)
    if have_torch:
        torch_window = torch.from_numpy(ids)

        def torch_window_logits() -> Any:
            with torch.no_grad():
                return model(torch_window)[0][:, -1]

        thunks["torch recompute"] = torch_window_logits
    inner = {name: _repeats(_rough(f)) for name, f in thunks.items()}
    per_token = interleaved(thunks, rounds, inner)

    # (c) generate end to end, (d) torch's two loops.
    prompt = window[:, :prompt_length]
    key = jax.random.key(1)
    start = time.perf_counter()
    generated = jax.block_until_ready(fn.generate(net, params, prompt, steps, key=key, top_k=1))
    first_call = time.perf_counter() - start
    # generate's compiled program alone, without its per-call checks in Python (private API).
    core_args = (jnp.full((1,), prompt_length, jnp.int32), key, jnp.float32(1.0), jnp.int32(1), jnp.float32(1.0))
    loops: dict[str, Callable[[], Any]] = {
        "funcnet generate": lambda: fn.generate(net, params, prompt, steps, key=key, top_k=1),
        "funcnet core": lambda: _generate(net, params, prompt, *core_args, steps=steps),
    }
    agreement = ""
    if have_torch:
        torch_prompt = torch.from_numpy(ids[:, :prompt_length])
        loops["torch recompute loop"] = lambda: torch_recompute(model, torch_prompt, steps, context)
        loops["torch KV-cache loop"] = lambda: torch_cached(model, torch_prompt, steps)
        by_recompute = torch_recompute(model, torch_prompt, steps, context).numpy()
        by_cache = torch_cached(model, torch_prompt, steps).numpy()
        same = lambda a, b: "all" if (a == b).all() else f"first {int(np.argmin(a[0] == b[0])) - prompt_length}"
        agreement = (
            f"Greedy tokens agree (of {steps} new): funcnet vs torch KV-cache {same(np.asarray(generated), by_cache)}, "
            f"torch recompute vs torch KV-cache {same(by_recompute, by_cache)}."
        )
    whole = interleaved(loops, gen_rounds)
    compile_time = first_call - whole["funcnet generate"]

    # The table.
    ms = lambda s: f"{1e3 * s:.3f}"
    rate = lambda s: f"{1 / s:,.0f}"
    reference = lambda name: per_token.get(name) if have_torch else None
    ratio = lambda s, ref: "" if ref is None else f"{s / ref:.2f}"
    rows = []
    for kind, label in (("step", "pure: a new cache"), ("in place", "cache donated")):
        for position in positions:
            s = per_token[f"funcnet {kind} {position}"]
            rows.append(
                [
                    f"(a) funcnet `decode_step`, {label}",
                    f"position {position}",
                    ms(s),
                    rate(s),
                    ratio(s, reference(f"torch step {position}")),
                ]
            )
    last = reference(f"torch step {positions[-1]}")
    s = per_token["funcnet recompute"]
    rows.append(
        ["(b) funcnet recompute `net.apply(window)[:, -1]`", f"window {context}", ms(s), rate(s), ratio(s, last)]
    )
    if have_torch:
        for position in positions:
            s = per_token[f"torch step {position}"]
            rows.append(["(d2) torch KV-cache step", f"position {position}", ms(s), rate(s), "1.00"])
        s = per_token["torch recompute"]
        rows.append(
            ["(d1) torch recompute `model(idx[:, -T:])[:, -1]`", f"window {context}", ms(s), rate(s), ratio(s, last)]
        )
    span = f"{steps} new after {prompt_length}"
    base = whole.get("torch KV-cache loop")
    labels = {
        "funcnet generate": "(c) funcnet `generate(top_k=1)`",
        "funcnet core": "(c) its compiled program alone (`decoding._generate`)",
        "torch recompute loop": "(d1) torch nanoGPT `generate` (recompute)",
        "torch KV-cache loop": "(d2) torch KV-cache loop",
    }
    for name, s in whole.items():
        rows.append([labels[name], span, ms(s / steps), rate(s / steps), ratio(s, base)])

    print(f"\nMachine: {machine()}; torch {torch.__version__ + f' with {cores} threads' if have_torch else 'absent'}")
    print(
        f"GPT (nanoGPT's): vocab {VOCAB}, {FEATURES} features, {HEADS} heads, {layers} layers, MLP {HIDDEN}, "
        f"context {context}, float32, batch 1. Per-token medians of {rounds} interleaved rounds; "
        f"generation: medians of {gen_rounds} interleaved rounds, greedy.\n"
    )
    print(
        table(
            ["run", "where", "ms / token", "tokens / s", "time vs torch KV-cache"],
            rows,
        )
    )
    print()
    for kind, label in (("step", "pure (a new cache)"), ("in place", "cache donated")):
        step_last = per_token[f"funcnet {kind} {positions[-1]}"]
        speedup = per_token["funcnet recompute"] / step_last
        flat = step_last / per_token[f"funcnet {kind} {positions[0]}"]
        print(
            f"decode_step, {label}, at position {positions[-1]} vs recomputing a {context}-token window: "
            f"{speedup:.1f}x faster per token (target >= 20x: {'met' if speedup >= 20 else 'NOT met'}); "
            f"{flat:.2f}x its time at position {positions[0]}."
        )
    print(
        f"funcnet generate: first call {first_call:.2f} s, of which compiling ~{compile_time:.2f} s; "
        f"then {whole['funcnet generate']:.3f} s for {steps} tokens, {whole['funcnet core']:.3f} s of it in the "
        "compiled program (the rest: generate's checks in Python, e.g. tracing net.apply for the vocabulary)."
    )
    if agreement:
        print(agreement)
    if not have_torch:
        print("torch is not installed: the torch rows are skipped.")


if __name__ == "__main__":
    main()
