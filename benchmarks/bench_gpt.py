"""Training nanoGPT's CPU GPT: funcnet's ``fit`` and a jitted ``train_step`` loop against torch.

The model of ``examples/gpt.py`` (imported from it): nanoGPT's CPU configuration, 4 layers, 4 heads,
128 features, context 64, batch 12, no biases, weight tying (``fn.tied``), GPT-2's initialisation;
on the examples' text (``char_lm.corpus()``, 103 characters), the first 90% for training, the last
10% for validation. The optimizer of the example: ``chain(clip_by_global_norm(1.0),
multi_optimizer({decay: adamw(0.1), no_decay: adamw(0)}, decay_labels(params)))``, beta2 0.99,
warmup (100 iterations) + cosine from 1e-3 to 1e-4.

The torch peer is written here as nanoGPT's ``model.py`` writes it (``wte``, ``wpe``, blocks of
``ln_1``/``attn`` (``c_attn`` packing q, k, v, ``c_proj``)/``ln_2``/``mlp`` (``c_fc``, GELU,
``c_proj``), ``ln_f``, ``lm_head`` tied to ``wte``, ``F.scaled_dot_product_attention`` causal),
trained as nanoGPT's ``train.py`` does: AdamW (betas (0.9, 0.99)) with weight decay 0.1 on the 2-D
params only (``configure_optimizers``' two param groups), ``clip_grad_norm_(1.0)``, the learning rate
set every iteration (funcnet's ``warmup_cosine_decay``, the same numbers: nanoGPT's ``get_lr``
differs by one step in the warmup). Its initial weights are funcnet's (a Dense or attention ``W``
``(in, out)`` is a Linear's ``weight.T``; ``c_attn.weight = cat(W_q.T, W_k.T, W_v.T)``; a
LayerNorm's ``weight`` is ``gamma``), checked before any timing: the same logits and loss, and the
same first-step gradients (float32, 1e-4 relative). Both train on the same batches: windows drawn
once with NumPy (nanoGPT's ``get_batch``, ``examples/gpt.py``'s ``windows``), in order.

Measured, every system in turn, chunk by chunk (interleaved round-robin, rotating who goes first;
medians over the chunks), from the same start along the whole run:

1. funcnet ``fit``: one call per chunk, ``epochs=1`` over the chunk's windows, ``shuffle=False``,
   resuming from the previous call's ``params`` and ``opt_state`` (its compile excluded: a
   warm-up call on a copy first);
2. ``jax.jit(fn.train_step(net, loss, optimizer), donate_argnums=(0, 1))`` called once per
   iteration from Python, the batches already on the device;
3. torch's training loop, eager, ``torch.set_num_threads(--torch-threads)``.

Around every chunk the process's user and system CPU time and minor page faults are read
(``getrusage``): a standalone step's extra time shows there. Then the validation loss each reached
(the same held-out windows), and each system's peak memory (``VmHWM``) in its own subprocess
(which imports only its own library) training 50 iterations (medians of ``--memory-repeats``
children). ``--memory`` measures only the peaks, with and without a warm persistent compilation
cache and ``MALLOC_ARENA_MAX=1``, beside the same training written in plain JAX with optax (where
optax is installed: what JAX itself costs). Targets: fit <= 0.9x torch's time per
iteration, the train_step loop <= 1.0x, validation losses within 0.02 nats, peak memory <= 1.0x
torch's.

    python benchmarks/bench_gpt.py                      # 2,000 iterations, 1 seed (~10 min on 2 cores)
    python benchmarks/bench_gpt.py --quick              # a tiny model, 20 iterations: check it runs
    python benchmarks/bench_gpt.py --seeds 3            # the validation loss as a mean of 3 seeds
    python benchmarks/bench_gpt.py --torch-threads 1    # torch on one thread
    python benchmarks/bench_gpt.py --memory             # only the peaks, under three settings, with
                                                        # a plain JAX + optax peer (~6 min)

torch's OpenMP threads spin while they wait; on a busy machine that costs torch up to 10x (an
iteration of 0.5-1 s instead of 0.1 s was seen here), so unless ``OMP_WAIT_POLICY`` is set the
script sets it to ``PASSIVE`` before torch is imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _memory import status_mb

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see the docstring)
ROLE = os.environ.get("BENCH_GPT_CHILD", "")  # a memory child: "fit", "step", "jax" or "torch"
HERE = Path(__file__).resolve().parent

if ROLE != "torch":  # a torch child imports no JAX, a JAX child no torch: peaks that do not mix
    import jax
    import jax.numpy as jnp
if ROLE in ("", "fit", "step"):  # the plain-JAX child imports no funcnet
    from _timing import machine, table

    import funcnet as fn
torch: Any = None
if ROLE in ("", "torch"):
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError:  # the torch peer is optional
        torch = None


def _example() -> Any:
    """``examples/gpt.py`` as a module (its ``gpt`` builder and ``windows``)."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    import gpt

    return gpt


def _maxrss_mb() -> float:
    """This process's peak resident memory. On Linux ``VmHWM``: ``getrusage``'s ``ru_maxrss`` keeps the
    peak of the process that forked it across ``exec``, so a child would report the parent's."""
    try:
        return status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def learning_rate(step: int, iterations: int) -> float:
    """``fn.warmup_cosine_decay(0.0, 1e-3, warmup, iterations, 1e-4)`` at ``step``, in Python."""
    warmup, peak, final = min(100, iterations // 10), 1e-3, 1e-4
    if step < warmup:
        return peak * step / max(warmup, 1)
    done = min(step - warmup, iterations - warmup) / (iterations - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * done))


# --- funcnet ------------------------------------------------------------------------------------


def funcnet_parts(config: dict) -> tuple[Any, Any, Any]:
    """The example's network, its initial params (from ``config["seed"]``) and its optimizer."""
    c = config
    net = _example().gpt(c["vocab"], c["features"], c["heads"], c["layers"], c["length"])
    _, params = net.init(jax.random.PRNGKey(c["seed"]), (-1, c["length"]))
    iterations = c["iterations"]
    schedule = fn.warmup_cosine_decay(0.0, 1e-3, min(100, iterations // 10), iterations, 1e-4)
    adamw = lambda decay: fn.adamw(schedule, b2=0.99, weight_decay=decay)
    optimizer = fn.chain(
        fn.clip_by_global_norm(1.0),
        fn.multi_optimizer({"decay": adamw(0.1), "no_decay": adamw(0.0)}, fn.decay_labels(params)),
    )
    return net, params, optimizer


def torch_layout(params: Any) -> dict[str, np.ndarray]:
    """funcnet's params (or gradients) under the torch model's parameter names, float32."""
    a = lambda v: np.array(v, dtype=np.float32)
    out = {"transformer.wte.weight": a(params[0].W), "transformer.wpe.weight": a(params[1].W)}
    blocks = params[2:-1]
    for i in range(len(blocks) // 2):
        (ln_1, attn), (ln_2, fc, proj) = blocks[2 * i], blocks[2 * i + 1]
        h = f"transformer.h.{i}."
        out[h + "ln_1.weight"] = a(ln_1.gamma)
        out[h + "attn.c_attn.weight"] = np.concatenate([a(attn.W_q).T, a(attn.W_k).T, a(attn.W_v).T])
        out[h + "attn.c_proj.weight"] = a(attn.W_o).T
        out[h + "ln_2.weight"] = a(ln_2.gamma)
        out[h + "mlp.c_fc.weight"] = a(fc.W).T
        out[h + "mlp.c_proj.weight"] = a(proj.W).T
    out["transformer.ln_f.weight"] = a(params[-1].gamma)
    return out


# --- torch (nanoGPT's model.py, bias=False, no dropout) -----------------------------------------

if torch is not None:

    class CausalSelfAttention(nn.Module):
        def __init__(self, features: int, heads: int) -> None:
            super().__init__()
            self.c_attn = nn.Linear(features, 3 * features, bias=False)
            self.c_proj = nn.Linear(features, features, bias=False)
            self.n_head = heads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self, features: int) -> None:
            super().__init__()
            self.c_fc = nn.Linear(features, 4 * features, bias=False)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * features, features, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, features: int, heads: int) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(features, bias=False)
            self.attn = CausalSelfAttention(features, heads)
            self.ln_2 = nn.LayerNorm(features, bias=False)
            self.mlp = MLP(features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab: int, features: int, heads: int, layers: int, length: int) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict(
                dict(
                    wte=nn.Embedding(vocab, features),
                    wpe=nn.Embedding(length, features),
                    h=nn.ModuleList(Block(features, heads) for _ in range(layers)),
                    ln_f=nn.LayerNorm(features, bias=False),
                )
            )
            self.lm_head = nn.Linear(features, vocab, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying

        def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
            t = self.transformer
            x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in t.h:
                x = block(x)
            logits = self.lm_head(t.ln_f(x))
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        def configure_optimizers(self, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
            """nanoGPT's: decay the 2-D params, not the others."""
            params = [p for p in self.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            return torch.optim.AdamW(groups, lr=0.0, betas=betas)

    def tokens(a: np.ndarray) -> torch.Tensor:
        """Token ids as torch wants them (int64, as nanoGPT's ``get_batch`` makes them)."""
        return torch.from_numpy(a).long()

    def torch_model(config: dict, weights: dict[str, np.ndarray]) -> GPT:
        c = config
        model = GPT(c["vocab"], c["features"], c["heads"], c["layers"], c["length"])
        state = {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in weights.items()}
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state)
        return model

    class TorchRun:
        """nanoGPT's training loop, ``chunk(xs, ys)`` running one iteration per batch."""

        def __init__(self, config: dict, weights: dict[str, np.ndarray]) -> None:
            self.model = torch_model(config, weights)
            self.optimizer = self.model.configure_optimizers(0.1, (0.9, 0.99))
            self.step, self.iterations = 0, config["iterations"]

        def chunk(self, xs: torch.Tensor, ys: torch.Tensor) -> float:
            for x, y in zip(xs, ys, strict=True):
                lr = learning_rate(self.step, self.iterations)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                _, loss = self.model(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.step += 1
            return loss.item()

        def val_loss(self, xs: np.ndarray, ys: np.ndarray) -> float:
            with torch.no_grad():
                losses = [float(self.model(tokens(x), tokens(y))[1]) for x, y in zip(xs, ys, strict=True)]
            return float(np.mean(losses))


# --- funcnet's two ways -------------------------------------------------------------------------

if ROLE != "torch":

    class FitRun:
        """``fit``, one call (``epochs=1``, ``shuffle=False``) per chunk, resuming from the last."""

        def __init__(self, net: Any, params: Any, optimizer: Any, batch: int) -> None:
            self.net, self.optimizer, self.batch = net, optimizer, batch
            self.params, self.opt_state = params, None

        def call(self, params: Any, opt_state: Any, x: np.ndarray, y: np.ndarray) -> Any:
            return fn.fit(
                self.net,
                fn.softmax_cross_entropy,
                self.optimizer,
                params,
                (x, y),
                epochs=1,
                batch_size=self.batch,
                shuffle=False,
                key=jax.random.PRNGKey(0),
                opt_state=opt_state,
            )

        def warm_up(self, x: np.ndarray, y: np.ndarray) -> None:
            """Compile, on a throwaway run (both kinds of call: the first has no ``opt_state``)."""
            first = self.call(self.params, None, x, y)
            jax.block_until_ready(self.call(first.params, first.opt_state, x, y).params)

        def chunk(self, x: np.ndarray, y: np.ndarray) -> float:
            result = self.call(self.params, self.opt_state, x, y)
            self.params, self.opt_state = jax.block_until_ready((result.params, result.opt_state))
            return float(result.history.train_loss[-1])

    class StepRun:
        """``jax.jit(train_step, donate_argnums=(0, 1))`` called once per iteration."""

        def __init__(self, net: Any, params: Any, optimizer: Any, copy: bool = True) -> None:
            """``copy``: train a copy (donated: never the caller's arrays; the memory child owns its own)."""
            self.step = jax.jit(fn.train_step(net, fn.softmax_cross_entropy, optimizer), donate_argnums=(0, 1))
            self.params = jax.tree_util.tree_map(jnp.copy, params) if copy else params
            self.opt_state = optimizer.init(self.params)
            self.optimizer = optimizer

        def warm_up(self, x: jax.Array, y: jax.Array) -> None:
            copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
            jax.block_until_ready(self.step(copy(self.params), copy(self.opt_state), x, y, None))

        def chunk(self, xs: list[jax.Array], ys: list[jax.Array]) -> float:
            params, opt_state, step = self.params, self.opt_state, self.step
            for x, y in zip(xs, ys, strict=True):
                params, opt_state, loss = step(params, opt_state, x, y, None)
            self.params, self.opt_state = jax.block_until_ready((params, opt_state))
            return loss.item()

    def funcnet_val_loss(net: Any, params: Any, xs: np.ndarray, ys: np.ndarray) -> float:
        loss = jax.jit(lambda p, x, y: fn.softmax_cross_entropy(net.apply(p, x), y))
        return float(np.mean([float(loss(params, x, y)) for x, y in zip(xs, ys, strict=True)]))


# --- plain JAX + optax: the memory peer that says what JAX itself costs ----------------------


def plain_jax(config: dict, weights: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
    """The same GPT written in plain JAX (``jax.numpy``, ``jax.nn.dot_product_attention``) on the
    torch layout's weights, and trained with optax as nanoGPT trains it: ``(step, params, state)``,
    ``step`` jitted with the params and state donated."""
    import optax

    c, pre = config, "transformer."
    params = {name: jnp.asarray(w) for name, w in weights.items()}

    def norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-5) * gamma

    def logits(p: dict, idx: jax.Array) -> jax.Array:
        b, t = idx.shape
        x = p[pre + "wte.weight"][idx] + p[pre + "wpe.weight"][:t]
        for i in range(c["layers"]):
            h = f"{pre}h.{i}."
            qkv = norm(x, p[h + "ln_1.weight"]) @ p[h + "attn.c_attn.weight"].T
            q, k, v = (a.reshape(b, t, c["heads"], -1) for a in jnp.split(qkv, 3, axis=-1))
            attended = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, -1)
            x = x + attended @ p[h + "attn.c_proj.weight"].T
            hidden = jax.nn.gelu(norm(x, p[h + "ln_2.weight"]) @ p[h + "mlp.c_fc.weight"].T, approximate=False)
            x = x + hidden @ p[h + "mlp.c_proj.weight"].T
        return norm(x, p[pre + "ln_f.weight"]) @ p[pre + "wte.weight"].T

    def loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

    iterations = c["iterations"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, min(100, iterations // 10), iterations, 1e-4)
    decay = {name: w.ndim >= 2 for name, w in params.items()}  # nanoGPT's groups
    adamw = optax.adamw(schedule, b2=0.99, weight_decay=0.1, mask=decay)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), adamw)

    def step(p: dict, state: Any, x: jax.Array, y: jax.Array) -> tuple[dict, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(p, x, y)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    return jax.jit(step, donate_argnums=(0, 1)), params, optimizer.init(params)


# --- memory children ----------------------------------------------------------------------------


def memory_child(path: str) -> None:
    """Train one chunk with ``ROLE``'s system (data and weights from ``path``) and print the peak
    memory after the imports, with everything built (model, params, optimizer state, data), and at
    the end, and the last loss."""
    imported = _maxrss_mb()
    data = np.load(path)
    config = json.loads(str(data["config"]))
    x, y = data["x"], data["y"]
    batch = config["batch"]
    xs, ys = x.reshape(-1, batch, x.shape[1]), y.reshape(-1, batch, y.shape[1])
    weights = {name[2:]: data[name] for name in data.files if name.startswith("w:")}
    train: Any
    if ROLE == "torch":
        torch.set_num_threads(config["torch_threads"])
        run = TorchRun(config, weights)
        txs, tys = tokens(xs), tokens(ys)
        train = lambda: run.chunk(txs, tys)
    elif ROLE == "fit":
        fit_run = FitRun(*funcnet_parts(config), batch)
        train = lambda: (fit_run.chunk(x, y), fit_run.chunk(x, y))[1]  # as in the benchmark: a resumed call
    else:
        dxs, dys = [jnp.asarray(a) for a in xs], [jnp.asarray(a) for a in ys]
        if ROLE == "step":
            step_run = StepRun(*funcnet_parts(config), copy=False)
            train = lambda: step_run.chunk(dxs, dys)
        else:
            step, params, state = plain_jax(config, weights)

            def train() -> float:
                p, s = params, state
                for bx, by in zip(dxs, dys, strict=True):
                    p, s, value = step(p, s, bx, by)
                return float(value)

    ready = _maxrss_mb()
    loss = train()
    print(json.dumps({"imported_mb": imported, "ready_mb": ready, "peak_mb": _maxrss_mb(), "loss": loss}))


def peak_memory(role: str, path: str, env: dict[str, str], repeats: int) -> dict[str, float]:
    """The medians over ``repeats`` fresh children (a peak varies by +-30 MB from run to run)."""
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", path],
            env={**os.environ, **env, "BENCH_GPT_CHILD": role},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the {role} memory child failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def memory_settings(cache: str) -> dict[str, dict[str, str]]:
    """The environments the memory table compares (each system, torch too, runs under each)."""
    warm = {
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return {
        "default": {},
        "warm compilation cache": warm,
        "warm cache, MALLOC_ARENA_MAX=1": {**warm, "MALLOC_ARENA_MAX": "1"},
    }


MEMORY_ROLES = {
    "fit": "funcnet `fit`",
    "step": "funcnet `train_step` loop",
    "jax": "plain JAX + optax loop",
    "torch": "torch eager loop",
}


def memory_lines(iterations: int, repeats: int) -> str:
    return (
        "Peak memory: each system alone in a fresh subprocess importing only its library, training "
        f"{iterations} iterations from the same weights on the same batches; VmHWM after the imports, with "
        f"the model, params, optimizer state and data built, and at the end; medians of {repeats} children."
    )


def memory_table(path: str, settings: dict[str, dict[str, str]], repeats: int) -> tuple[str, dict]:
    """Each system's peaks under each setting, as a table, and the default setting's numbers."""
    roles = [r for r in MEMORY_ROLES if r != "jax" or importlib.util.find_spec("optax") is not None]
    rows, default = [], {}
    for setting, env in settings.items():
        if "JAX_COMPILATION_CACHE_DIR" in env:  # fill the cache first: the rows measure a second run
            for role in roles:
                if role != "torch":
                    peak_memory(role, path, env, 1)
        measured = {role: peak_memory(role, path, env, repeats) for role in roles}
        default = default or measured
        for role in roles:
            m = measured[role]
            rows.append(
                [
                    setting,
                    MEMORY_ROLES[role],
                    f"{m['imported_mb']:.0f}",
                    f"{m['ready_mb']:.0f}",
                    f"{m['peak_mb']:.0f}",
                    f"{m['peak_mb'] / measured['torch']['peak_mb']:.2f}",
                ]
            )
    header = ["setting", "system", "after imports MB", "model built MB", "peak MB", "peak vs torch"]
    losses = ", ".join(f"{MEMORY_ROLES[role]} {default[role]['loss']:.4f}" for role in roles)
    same = f"The same training in each: the last loss of the default children, {losses} (`fit`'s: its call's mean)."
    return table(header, rows) + "\n\n" + same, default


# --- the checks before timing -------------------------------------------------------------------


def check_same(net: Any, params: Any, config: dict, x: np.ndarray, y: np.ndarray) -> str:
    """Same logits, loss and first-step gradients in funcnet and torch, or an AssertionError."""
    model = torch_model(config, torch_layout(params))
    ours = np.asarray(jax.jit(net.apply)(params, jnp.asarray(x)))
    our_loss, grads = jax.value_and_grad(lambda p: fn.softmax_cross_entropy(net.apply(p, x), y))(params)
    logits, loss = model(tokens(x), tokens(y))
    loss.backward()
    theirs = logits.detach().numpy()
    error, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs)))
    if not error <= 1e-4 * max(1.0, scale):
        raise AssertionError(f"funcnet's and torch's logits differ by {error:.2e} (scale {scale:.2f}).")
    loss_error = abs(float(our_loss) - loss.item())
    if not loss_error <= 1e-5 * max(1.0, loss.item()):
        raise AssertionError(f"the losses differ: funcnet {float(our_loss):.6f}, torch {float(loss):.6f}.")
    ours_g = torch_layout(grads)
    worst = 0.0
    for name, p in model.named_parameters():
        g, g_scale = p.grad.numpy(), float(np.max(np.abs(p.grad.numpy())))
        relative = float(np.max(np.abs(ours_g[name] - g))) / max(g_scale, 1e-12)
        if not relative <= 1e-4:
            raise AssertionError(f"first-step gradients of {name} differ: {relative:.1e} of their largest.")
        worst = max(worst, relative)
    return (
        f"Same start: logits max |funcnet - torch| = {error:.1e} (scale {scale:.1f}), loss "
        f"{float(our_loss):.4f} both (|diff| {loss_error:.1e}); first-step gradients within {worst:.1e} "
        "of each tensor's largest (tied wte/lm_head: both uses summed)."
    )


# --- where a train_step call's time goes --------------------------------------------------------


def step_overheads(step_run: StepRun, x: jax.Array, y: jax.Array, calls: int) -> dict[str, Any]:
    """Host overhead per call of a jitted function taking and returning the same pytrees (donated,
    doing nothing), the leaf counts, and the step program's compiled cost analysis."""
    params, opt_state = step_run.params, step_run.opt_state
    leaves = len(jax.tree_util.tree_leaves(params)), len(jax.tree_util.tree_leaves(opt_state))
    nothing = jax.jit(lambda p, s, x, y: (p, s, jnp.zeros(())), donate_argnums=(0, 1))
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    p, s = copy(params), copy(opt_state)
    p, s, _ = jax.block_until_ready(nothing(p, s, x, y))
    start = time.perf_counter()
    for _ in range(calls):
        p, s, _ = nothing(p, s, x, y)
    jax.block_until_ready(p)
    dispatch = (time.perf_counter() - start) / calls
    compiled = step_run.step.lower(params, opt_state, x, y, None).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "leaves": leaves,
        "dispatch_s": dispatch,
        "flops": float(cost.get("flops", float("nan"))),
        "bytes": float(cost.get("bytes accessed", float("nan"))),
        "hlo_lines": len(compiled.as_text().splitlines()),
        "temp_bytes": float(compiled.memory_analysis().temp_size_in_bytes),
    }


def _usage() -> tuple[float, float, int]:
    """This process's user and system CPU seconds and minor page faults so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 20 iterations: check that it runs")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per run (default 2,000)")
    parser.add_argument("--chunk", type=int, default=None, help="iterations per timed sample (default 200)")
    parser.add_argument("--seeds", type=int, default=1, help="runs from different inits and windows (default 1)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--memory", action="store_true", help="only the peak-memory table, under each setting (~6 min on 2 cores)"
    )
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh children per peak (median; default 3)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if torch is None:
        raise SystemExit("bench_gpt.py compares funcnet with torch: install torch.")
    torch.set_num_threads(args.torch_threads)
    features, heads, layers, length, batch = 128, 4, 4, 64, 12
    iterations, chunk, val_batches = args.iterations or 2000, args.chunk or 200, 100
    if args.quick:
        features, heads, layers, length = 32, 2, 1, 16
        iterations, chunk, val_batches, args.seeds = args.iterations or 20, args.chunk or 10, 10, 1
    memory_iterations = min(chunk, 50)  # the children's: enough for the peak
    if iterations % chunk:
        raise SystemExit(f"--iterations ({iterations}) must be a multiple of --chunk ({chunk}).")
    example = _example()
    import char_lm

    text = char_lm.corpus()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    split = int(0.9 * len(ids))
    base = dict(vocab=len(chars), features=features, heads=heads, layers=layers, length=length, batch=batch)
    base.update(iterations=iterations, torch_threads=args.torch_threads)

    times: dict[str, list[float]] = {"fit": [], "step": [], "torch": []}
    usage: dict[str, list[list[float]]] = {"fit": [], "step": [], "torch": []}  # per iteration: user s, sys s, faults
    val: dict[str, list[float]] = {"fit": [], "step": [], "torch": []}
    checks, first_chunk = [], {}
    scratch = tempfile.TemporaryDirectory()
    path = os.path.join(scratch.name, "data.npz")
    for seed in range(args.seeds):
        config = {**base, "seed": seed}
        rng = np.random.default_rng(seed)
        x, y = example.windows(ids[:split], iterations * batch, length, rng)  # nanoGPT's get_batch, drawn once
        vx, vy = example.windows(ids[split:], val_batches * batch, length, rng)
        vx, vy = vx.reshape(val_batches, batch, length), vy.reshape(val_batches, batch, length)
        net, params, optimizer = funcnet_parts(config)
        if seed == 0:  # the memory children's data: the first windows, the same initial weights
            n = memory_iterations * batch
            weights = {f"w:{name}": w for name, w in torch_layout(params).items()}
            np.savez(path, config=json.dumps(config), x=x[:n], y=y[:n], **weights)
        if args.memory:
            settings = memory_settings(os.path.join(scratch.name, "cache"))
            memory_text, _ = memory_table(path, settings, args.memory_repeats)
            print(memory_lines(memory_iterations, args.memory_repeats) + "\n\n" + memory_text)
            return
        if seed == 0:
            n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
        checks.append(check_same(net, params, config, x[:batch], y[:batch]))

        fit_run = FitRun(net, params, optimizer, batch)
        step_run = StepRun(net, params, optimizer)
        torch_run = TorchRun(config, torch_layout(params))
        chunks = [slice(i * chunk * batch, (i + 1) * chunk * batch) for i in range(iterations // chunk)]
        fit_data = [(x[s], y[s]) for s in chunks]
        batches = lambda a: a.reshape(chunk, batch, length)
        step_data = [([jnp.asarray(b) for b in batches(x[s])], [jnp.asarray(b) for b in batches(y[s])]) for s in chunks]
        torch_data = [(tokens(batches(x[s])), tokens(batches(y[s]))) for s in chunks]
        start = time.perf_counter()
        fit_run.warm_up(*fit_data[0])
        compile_fit = time.perf_counter() - start
        start = time.perf_counter()
        step_run.warm_up(step_data[0][0][0], step_data[0][1][0])
        compile_step = time.perf_counter() - start
        runs: dict[str, tuple[Any, list]] = {
            "fit": (fit_run, fit_data),
            "step": (step_run, step_data),
            "torch": (torch_run, torch_data),
        }
        names = list(runs)
        for i in range(len(chunks)):
            order = names[i % 3 :] + names[: i % 3]  # rotate who goes first
            for name in order:
                run, data = runs[name]
                start, before = time.perf_counter(), _usage()
                train_loss = run.chunk(*data[i])
                seconds = (time.perf_counter() - start) / chunk
                times[name].append(seconds)
                usage[name].append([(b - a) / chunk for a, b in zip(before, _usage(), strict=True)])
                if i == 0 and seed == 0:
                    first_chunk[name] = train_loss
            done = f"seed {seed}, iteration {(i + 1) * chunk}/{iterations}: " + ", ".join(
                f"{n} {1e3 * times[n][-1]:.1f} ms/it" for n in names
            )
            print(done, file=sys.stderr, flush=True)
        val["fit"].append(funcnet_val_loss(net, fit_run.params, vx, vy))
        val["step"].append(funcnet_val_loss(net, step_run.params, vx, vy))
        val["torch"].append(torch_run.val_loss(vx, vy))
        if seed == 0:
            overheads = step_overheads(step_run, step_data[0][0][0], step_data[0][1][0], 20 if args.quick else 200)
            memory_text, memory = memory_table(path, {"default": {}}, args.memory_repeats)

    # --- the table ------------------------------------------------------------------------------
    median = {name: float(np.median(t)) for name, t in times.items()}
    cpu = {name: np.median(np.array(u), axis=0) for name, u in usage.items()}
    cpu_torch = float(cpu["torch"][0] + cpu["torch"][1])  # user + system, the whole process
    mean_val = {name: float(np.mean(v)) for name, v in val.items()}
    labels = {
        "fit": "funcnet `fit` (one call per chunk, shuffle=False)",
        "step": "funcnet `jax.jit(train_step, donate_argnums=(0, 1))` loop",
        "torch": f"torch eager loop ({args.torch_threads} threads)",
    }
    rows = []
    for name in names:
        t = median[name]
        spread = f"{1e3 * np.percentile(times[name], 25):.1f}-{1e3 * np.percentile(times[name], 75):.1f}"
        rows.append(
            [
                labels[name],
                f"{1e3 * t:.1f}",
                spread,
                f"{t / median['torch']:.2f}",
                f"{1e3 * (cpu[name][0] + cpu[name][1]):.1f} ({(cpu[name][0] + cpu[name][1]) / cpu_torch:.2f})",
                f"{mean_val[name]:.4f}",
                f"{mean_val[name] - mean_val['torch']:+.4f}",
                f"{memory[name]['peak_mb']:.0f} ({memory[name]['imported_mb']:.0f})",
                f"{memory[name]['peak_mb'] / memory['torch']['peak_mb']:.2f}",
            ]
        )
    seeds = f"{args.seeds} seed{'s' if args.seeds > 1 else ''}"
    lines = [
        f"Machine: {machine()}; torch {torch.__version__}, {args.torch_threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (a shared machine: medians of interleaved chunks). "
        + memory_lines(memory_iterations, args.memory_repeats),
        f"GPT (examples/gpt.py, nanoGPT's CPU config): vocab {len(chars)}, {features} features, {heads} heads, "
        f"{layers} layers, context {length}, batch {batch}, bias=False, tied, {n_params:,} params, float32. "
        f"{iterations} iterations x {seeds}, timed in {len(times['torch'])} chunks of {chunk} per system, "
        f"interleaved (rotating order); validation loss on {val_batches * batch} held-out windows"
        f"{', mean over seeds' if args.seeds > 1 else ''}.",
        *checks[:1],
        "",
        table(
            [
                "system",
                "ms / iteration (median)",
                "IQR (ms)",
                "time vs torch",
                "CPU ms / iteration (vs torch)",
                f"val loss after {iterations}",
                "vs torch (nats)",
                "peak RSS MB (after imports)",
                "peak vs torch",
            ],
            rows,
        ),
        "",
    ]
    fit_ratio, step_ratio = median["fit"] / median["torch"], median["step"] / median["torch"]
    gap = max(abs(mean_val[n] - mean_val["torch"]) for n in ("fit", "step"))
    memory_ratio = max(memory[n]["peak_mb"] / memory["torch"]["peak_mb"] for n in ("fit", "step"))
    verdict = lambda ok: "met" if ok else "NOT met"
    lines += [
        f"Targets: fit <= 0.9x torch: {fit_ratio:.2f}x, {verdict(fit_ratio <= 0.9)}; train_step loop <= 1.0x: "
        f"{step_ratio:.2f}x, {verdict(step_ratio <= 1.0)}; val loss within 0.02 nats: {gap:.4f}, "
        f"{verdict(gap <= 0.02)}; peak memory <= 1.0x torch's: {memory_ratio:.2f}x (the larger funcnet one), "
        f"{verdict(memory_ratio <= 1.0)}.",
        f"Compiling (excluded above): fit {compile_fit:.1f} s (two calls), train_step {compile_step:.1f} s. "
        f"Train loss after the first chunk: fit {first_chunk['fit']:.4f} (the chunk's mean), last batch's "
        f"train_step {first_chunk['step']:.4f}, torch {first_chunk['torch']:.4f}"
        + ". Val losses per seed: "
        + "; ".join(f"{name} " + ", ".join(f"{v:.4f}" for v in val[name]) for name in names)
        + ".",
        f"Where a train_step call goes: the step loop is {median['step'] / median['fit']:.3f}x fit's time per "
        f"iteration. A jitted no-op taking and returning the same trees ({overheads['leaves'][0]} param leaves, "
        f"{overheads['leaves'][1]} optimizer-state leaves, donated) costs {1e6 * overheads['dispatch_s']:.0f} us "
        f"a call, {overheads['dispatch_s'] / median['step']:.1%} of a step; the step program: "
        f"{overheads['flops'] / 1e6:.0f} MFLOP, {overheads['bytes'] / 2**20:.0f} MiB accessed (XLA's cost "
        f"analysis), {overheads['hlo_lines']} lines of optimized HLO. Per iteration (medians over chunks, "
        "CPU of the whole process): "
        + "; ".join(
            f"{n} {1e3 * cpu[n][0]:.1f} ms user + {1e3 * cpu[n][1]:.1f} ms system, {cpu[n][2]:,.0f} minor page faults"
            for n in names
        )
        + f". The step program's temporary buffer is {overheads['temp_bytes'] / 2**20:.1f} MiB, allocated at every "
        "call (inside fit's scan, once per call of many steps): "
        + (
            "above glibc's largest dynamic mmap threshold (32 MiB): every call maps it fresh and faults its pages in."
            if overheads["temp_bytes"] > 32 * 2**20
            else "below glibc's largest dynamic mmap threshold (32 MiB), so calls reuse the heap's pages."
        ),
    ]
    print("\n".join([*lines, "", memory_text]))


if __name__ == "__main__":
    main()
