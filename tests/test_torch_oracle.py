"""PyTorch as an independent oracle, where it is installed (it is not a test dependency: these
tests skip without it). They check the weight mappings the recurrent and attention params state,
and the newer ops' forward and backward against torch's own.

    pip install torch && pytest tests/test_torch_oracle.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

torch = pytest.importorskip("torch")
rng = np.random.default_rng(0)


def _close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=1e-10, atol=1e-12)


def _run(module, x, g):
    xt = torch.tensor(x, requires_grad=True)
    out, _ = module(xt)
    (out * torch.tensor(g)).sum().backward()
    return out, xt


def test_rnn_matches_torch_through_the_documented_mapping():
    x, g = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 6))
    torch.manual_seed(0)
    rnn = torch.nn.RNN(4, 6, batch_first=True).double()
    out, xt = _run(rnn, x, g)
    W = np.concatenate([rnn.weight_ih_l0.detach().numpy().T, rnn.weight_hh_l0.detach().numpy().T])
    params = fn.RNNParams(jnp.asarray(W), jnp.asarray((rnn.bias_ih_l0 + rnn.bias_hh_l0).detach().numpy()[None]))
    ours, vjp = jax.vjp(lambda x, p: fn.rnn(x, p), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(g))
    _close(ours, out)
    _close(dx, xt.grad)
    _close(dp.W, torch.cat([rnn.weight_ih_l0.grad.T, rnn.weight_hh_l0.grad.T]))
    _close(dp.B[0], rnn.bias_ih_l0.grad)


def test_lstm_matches_torch_through_the_documented_mapping():
    x, g = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 6))
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(4, 6, batch_first=True).double()
    out, xt = _run(lstm, x, g)
    ih, hh = lstm.weight_ih_l0.detach().numpy().T, lstm.weight_hh_l0.detach().numpy().T
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy()
    gate = lambda k: slice(6 * k, 6 * (k + 1))  # torch's order: i, f, g, o
    W = lambda k: jnp.asarray(np.concatenate([ih[:, gate(k)], hh[:, gate(k)]]))
    B = lambda k: jnp.asarray(b[gate(k)][None])
    params = fn.LSTMParams(W(1), B(1), W(0), B(0), W(2), B(2), W(3), B(3))
    ours, vjp = jax.vjp(lambda x, p: fn.lstm(x, p), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(g))
    _close(ours, out)
    _close(dx, xt.grad)
    grad_ih, grad_hh = lstm.weight_ih_l0.grad.T, lstm.weight_hh_l0.grad.T
    for name, k in (("W_i", 0), ("W_f", 1), ("W_c", 2), ("W_o", 3)):
        _close(getattr(dp, name), torch.cat([grad_ih[:, gate(k)], grad_hh[:, gate(k)]]))


def test_layer_norm_embedding_avg_pool_and_sequence_cross_entropy_match_torch():
    x, gamma, beta = rng.standard_normal((3, 4, 6)), rng.standard_normal(6), rng.standard_normal(6)
    tensors = [torch.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    out = torch.nn.functional.layer_norm(tensors[0], (6,), tensors[1], tensors[2], 1e-5)
    g = rng.standard_normal(out.shape)
    (out * torch.tensor(g)).sum().backward()
    ours, vjp = jax.vjp(fn.layer_norm, *map(jnp.asarray, (x, gamma, beta)))
    _close(ours, out)
    for mine, theirs in zip(vjp(jnp.asarray(g)), tensors, strict=True):
        _close(mine, theirs.grad)

    ids, W = rng.integers(0, 5, (4, 3)), rng.standard_normal((5, 2))
    Wt = torch.tensor(W, requires_grad=True)
    out = torch.nn.functional.embedding(torch.tensor(ids), Wt)
    g = rng.standard_normal(out.shape)
    (out * torch.tensor(g)).sum().backward()
    ours, vjp = jax.vjp(lambda W: fn.embedding(jnp.asarray(ids, jnp.int32), W), jnp.asarray(W))
    _close(ours, out)
    _close(vjp(jnp.asarray(g))[0], Wt.grad)

    images = rng.standard_normal((2, 7, 8, 3))
    xt = torch.tensor(images.transpose(0, 3, 1, 2), requires_grad=True)  # torch is NCHW
    out = torch.nn.functional.avg_pool2d(xt, 3, 2)
    g = rng.standard_normal(out.shape)
    (out * torch.tensor(g)).sum().backward()
    ours, vjp = jax.vjp(lambda x: fn.avg_pool2d(x, 3, 2), jnp.asarray(images))
    _close(ours.transpose(0, 3, 1, 2), out)
    _close(vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))[0].transpose(0, 3, 1, 2), xt.grad)

    logits, labels = rng.standard_normal((3, 4, 5)), rng.integers(0, 5, (3, 4))
    lt = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(lt.permute(0, 2, 1), torch.tensor(labels))  # mean over positions
    loss.backward()
    value, grad = jax.value_and_grad(fn.softmax_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
    _close(value, loss)
    _close(grad, lt.grad)


def test_dot_product_attention_matches_torch_sdpa():
    """Causal, with a boolean mask (True = attend, SDPA's polarity) and a non-default scale."""
    F = torch.nn.functional
    q, k, v = rng.standard_normal((2, 6, 3, 4)), rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((2, 5, 3, 2))
    mask = rng.random((2, 1, 6, 5)) > 0.3
    mask[..., 0] = True  # every query sees a key (torch gives NaN rows where none is visible)
    for is_causal, m, scale in ((True, None, None), (False, mask, 0.3)):
        tensors = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
        t = [a.transpose(1, 2) for a in tensors]  # torch is (batch, heads, length, head_dim)
        out = F.scaled_dot_product_attention(
            *t, attn_mask=None if m is None else torch.tensor(m), is_causal=is_causal, scale=scale
        ).transpose(1, 2)
        g = rng.standard_normal(out.shape)
        (out * torch.tensor(g)).sum().backward()
        f = lambda q, k, v, is_causal=is_causal, m=m, scale=scale: fn.dot_product_attention(
            q, k, v, is_causal=is_causal, mask=None if m is None else jnp.asarray(m), scale=scale, block_size=2
        )
        ours, vjp = jax.vjp(f, *map(jnp.asarray, (q, k, v)))
        _close(ours, out)
        for mine, theirs in zip(vjp(jnp.asarray(g)), tensors, strict=True):
            _close(mine, theirs.grad)


def test_multi_head_attention_matches_torch_through_the_documented_mapping():
    D, heads, T = 8, 2, 5
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(D, heads, batch_first=True).double()
    with torch.no_grad():  # torch starts its biases at zero: make them count
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x, g = rng.standard_normal((3, T, D)), rng.standard_normal((3, T, D))
    xt = torch.tensor(x, requires_grad=True)
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)  # torch's attn_mask: True = may NOT attend
    out, _ = mha(xt, xt, xt, attn_mask=blocked, need_weights=False)
    (out * torch.tensor(g)).sum().backward()
    W, b = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    part = lambda a, i: jnp.asarray(a[i * D : (i + 1) * D])
    params = fn.AttentionParams(
        part(W, 0).T, part(b, 0)[None], part(W, 1).T, part(b, 1)[None], part(W, 2).T, part(b, 2)[None],
        jnp.asarray(mha.out_proj.weight.detach().numpy().T), jnp.asarray(mha.out_proj.bias.detach().numpy()[None]),
    )  # fmt: skip
    layer = fn.MultiHeadAttention(heads, is_causal=True, block_size=2)
    ours, vjp = jax.vjp(layer.apply, params, jnp.asarray(x))
    dp, dx = vjp(jnp.asarray(g))
    _close(ours, out)
    _close(dx, xt.grad)
    grad_W, grad_b = mha.in_proj_weight.grad, mha.in_proj_bias.grad
    for i, (name_W, name_B) in enumerate((("W_q", "B_q"), ("W_k", "B_k"), ("W_v", "B_v"))):
        _close(getattr(dp, name_W), grad_W[i * D : (i + 1) * D].T)
        _close(getattr(dp, name_B)[0], grad_b[i * D : (i + 1) * D])
    _close(dp.W_o, mha.out_proj.weight.grad.T)
    _close(dp.B_o[0], mha.out_proj.bias.grad)


def test_gelu_matches_torch():
    x = rng.standard_normal((4, 6))
    xt = torch.tensor(x, requires_grad=True)
    out = torch.nn.functional.gelu(xt)  # exact (erf) by default
    g = rng.standard_normal(out.shape)
    (out * torch.tensor(g)).sum().backward()
    ours, vjp = jax.vjp(fn.gelu, jnp.asarray(x))
    _close(ours, out)
    _close(vjp(jnp.asarray(g))[0], xt.grad)


@pytest.mark.parametrize("images", [False, True])
def test_batch_norm_matches_torch_over_training_steps_then_eval(images):
    """BatchNorm(momentum=m) against torch.nn.BatchNorm1d/2d(momentum=1 - m), float64: outputs,
    dx, dgamma, dbeta and the running statistics over several training steps, then eval mode."""
    momentum, eps = 0.7, 1e-3
    shape = (6, 4, 5, 3) if images else (10, 3)  # ours NHWC, torch NCHW
    module = (torch.nn.BatchNorm2d if images else torch.nn.BatchNorm1d)(3, eps=eps, momentum=1 - momentum).double()
    to_torch = (lambda a: a.transpose(0, 3, 1, 2)) if images else (lambda a: a)
    layer = fn.BatchNorm(momentum, eps)
    params = jax.tree_util.tree_map(jnp.asarray, layer.init(jax.random.PRNGKey(0), (-1, *shape[1:]))[1])
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
        module.bias.copy_(torch.tensor(beta))
    params = params._replace(gamma=jnp.asarray(gamma), beta=jnp.asarray(beta))
    module.train()
    for step in range(4):
        x, g = rng.standard_normal(shape) * (step + 1) + step, rng.standard_normal(shape)
        xt = torch.tensor(to_torch(x), requires_grad=True)
        out = module(xt)
        module.weight.grad = module.bias.grad = None
        (out * torch.tensor(to_torch(g))).sum().backward()
        (y, new), vjp = jax.vjp(lambda x, p: fn.train_apply(layer)(p, x), jnp.asarray(x), params)
        dx, dp = vjp((jnp.asarray(g), jax.tree_util.tree_map(jnp.zeros_like, new)))
        _close(to_torch(np.asarray(y)), out)
        _close(to_torch(np.asarray(dx)), xt.grad)
        _close(dp.gamma, module.weight.grad)
        _close(dp.beta, module.bias.grad)
        params = new
        _close(params.stats.mean, module.running_mean)
        _close(params.stats.var, module.running_var)
    module.eval()
    x = rng.standard_normal(shape)
    _close(to_torch(np.asarray(layer.apply(params, jnp.asarray(x)))), module(torch.tensor(to_torch(x))))
