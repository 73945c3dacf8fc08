"""The FDNC transformer: size, equivariance, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdnc_jax.model.fdnc import FDNC, Model, ModelConfig, count_params

TINY = ModelConfig(width=16, layers=2, heads=2, ff_width=32, dropout=0.0)
DISTANCE = ModelConfig(width=16, layers=2, heads=2, ff_width=32, dropout=0.0, distance_bias=True)


def _layer_params(d, ff):
    attention = 3 * (d * d + d) + (d * d + d)
    return attention + (d * ff + ff) + (ff * d + d) + 2 * 2 * d


def test_paper_parameter_count():
    model = FDNC(ModelConfig(), rngs=nnx.Rngs(0))
    n = count_params(model)
    # 6 post-norm encoder layers + Linear(3→128) + outlier Linear(128→1); the original's
    # BatchNorm(128) (256 more) is a fixed affine map at inference, folded into the Linear here.
    assert n == 6 * _layer_params(128, 2048) + (3 * 128 + 128) + (128 + 1) == 3_558_785
    # The paper's "4.15 M" counts one more encoder layer: PyTorch registers the prototype layer
    # passed to nn.TransformerEncoder as a module of its own (unused in the forward pass).
    assert abs(n + _layer_params(128, 2048) - 4.15e6) < 0.01e6


def _inputs(rng, b=2, n=12, m=10):
    k1, k2 = jax.random.split(rng)
    t = jax.random.normal(k1, (b, n, 3)) * 0.3
    s = jax.random.normal(k2, (b, m, 3)) * 0.3
    return t, jnp.ones((b, n), bool), s, jnp.ones((b, m), bool)


def test_log_probs_normalised_and_shape(rng):
    model = FDNC(TINY, rngs=nnx.Rngs(0))
    out = model(*_inputs(rng))
    assert out.shape == (2, 10, 13)
    np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, DISTANCE], ids=["paper", "distance"])
def test_equivariant_to_permutations(rng, cfg):
    model = FDNC(cfg, rngs=nnx.Rngs(0))
    t, tm, s, sm = _inputs(rng)
    out = model(t, tm, s, sm)
    pt = np.random.default_rng(0).permutation(12)
    ps = np.random.default_rng(1).permutation(10)
    out_p = model(t[:, pt], tm, s[:, ps], sm)
    expected = out[:, ps][:, :, np.append(pt, 12)]
    np.testing.assert_allclose(out_p, expected, atol=2e-5)


@pytest.mark.parametrize("cfg", [TINY, DISTANCE], ids=["paper", "distance"])
def test_padding_changes_nothing(rng, cfg):
    model = FDNC(cfg, rngs=nnx.Rngs(0))
    t, tm, s, sm = _inputs(rng)
    out = model(t, tm, s, sm)
    big = 7.0 * jnp.ones((2, 4, 3))
    t_pad = jnp.concatenate([t, big], 1)
    s_pad = jnp.concatenate([s, -big], 1)
    tm_pad = jnp.concatenate([tm, jnp.zeros((2, 4), bool)], 1)
    sm_pad = jnp.concatenate([sm, jnp.zeros((2, 4), bool)], 1)
    out_pad = model(t_pad, tm_pad, s_pad, sm_pad)
    np.testing.assert_allclose(out_pad[:, :10, :12], out[:, :, :12], atol=2e-5)
    np.testing.assert_allclose(out_pad[:, :10, -1], out[:, :, -1], atol=2e-5)
    assert float(jnp.max(jnp.exp(out_pad[:, :10, 12:16]))) == 0.0  # padded template columns


@pytest.mark.parametrize("cfg", [TINY, DISTANCE], ids=["paper", "distance"])
def test_dropout_only_in_training(rng, cfg):
    """Active dropout takes nnx.dot_product_attention (the accelerators' path) on every device."""
    model = FDNC(dataclass_replace(cfg, dropout=0.5), rngs=nnx.Rngs(0))
    args = _inputs(rng)
    a = model(*args, deterministic=False, dropout_key=jax.random.key(1))
    b = model(*args, deterministic=False, dropout_key=jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model(*args), model(*args))


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_color_input_switch(rng):
    cfg = dataclass_replace(TINY, color_features=3)
    model = FDNC(cfg, rngs=nnx.Rngs(0))
    t, tm, s, sm = _inputs(rng)
    tc, sc = jnp.full((2, 12, 3), 1 / 3), jnp.full((2, 10, 3), 1 / 3)
    assert model(t, tm, s, sm, tc, sc).shape == (2, 10, 13)
    with pytest.raises(ValueError, match="takes color input"):
        model(t, tm, s, sm)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("width", 30, "divisible"),
        ("dropout", 1.5, "dropout"),
        ("layers", 0, "positive"),
    ],
)
def test_bad_model_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({field: value, **({"heads": 4} if field == "width" else {})})
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_dict({"depth": 3})


def test_model_bundle_round_trip():
    model = Model.create(TINY, seed=1)
    assert model.num_params == count_params(model.module())
    assert not model.uses_color


@pytest.mark.parametrize("batch", [(), (3,)])
def test_head_by_head_attention_equals_dot_product_attention(rng, batch):
    from fdnc_jax.model.layers import head_by_head_attention, key_padding_mask

    q, k, v = (jax.random.normal(key, (*batch, 9, 4, 8)) * 2 for key in jax.random.split(rng, 3))
    valid = jnp.arange(9) < 6  # The last 3 tokens are padding: masked as keys...
    valid = jnp.broadcast_to(valid, (*batch, 9))
    mask = key_padding_mask(valid.reshape(-1, 9)).reshape(*batch, 1, 1, 9)
    want = nnx.dot_product_attention(q, k, v, mask=mask, deterministic=True)
    got = head_by_head_attention(q, k, v, mask=mask, deterministic=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # ...and rows of padded queries.
    if jax.default_backend() == "cpu":  # The head-by-head path really ran (a lax.map = scan).
        jaxpr = jax.make_jaxpr(
            lambda q, k, v: head_by_head_attention(q, k, v, mask=mask, deterministic=True)
        )(q, k, v)
        assert "scan" in str(jaxpr)
    key_mask = jnp.arange(9) < 6  # A 1-D [L] key mask (< 3-D) takes the standard path.
    np.testing.assert_allclose(
        head_by_head_attention(q, k, v, mask=key_mask, deterministic=True),
        nnx.dot_product_attention(q, k, v, mask=key_mask, deterministic=True),
        rtol=1e-5,
        atol=1e-5,
    )
    no_mask = head_by_head_attention(q, k, v, deterministic=True)
    np.testing.assert_allclose(no_mask, nnx.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    # With a full [.., 1, L, L] mask (e.g. causal-like patterns) too.
    full = jnp.tril(jnp.ones((9, 9), bool))[None]
    np.testing.assert_allclose(
        head_by_head_attention(q, k, v, mask=full, deterministic=True),
        nnx.dot_product_attention(q, k, v, mask=full, deterministic=True),
        rtol=1e-5,
        atol=1e-5,
    )


def test_matmul_dtype_bfloat16_is_close_and_reversible(rng):
    model = Model.create(ModelConfig(width=32, layers=2, heads=4, ff_width=64, dropout=0.0))
    inputs = _inputs(rng, b=1, n=40, m=36)
    f32 = model.module()(*inputs)
    fast = model.with_matmul_dtype("bfloat16")
    assert fast.matmul_dtype == "bfloat16" and model.matmul_dtype == "float32"
    assert "bfloat16" in repr(fast)
    bf16 = fast.module()(*inputs)
    diff = np.abs(np.exp(np.asarray(bf16)) - np.exp(np.asarray(f32)))  # In probability.
    assert 0 < diff.max() < 0.05  # Really computed differently, and close.
    assert np.mean(np.argmax(bf16, -1) == np.argmax(f32, -1)) > 0.95
    back = fast.with_matmul_dtype("float32").module()(*inputs)
    np.testing.assert_array_equal(back, f32)
    # Only the encoder blocks changed: the same parameters.
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), fast.params, model.params))
    with pytest.raises(ValueError, match="matmul_dtype"):
        model.with_matmul_dtype("float16")


def test_distance_bias_model_weights_round_trip(rng, tmp_path):
    from fdnc_jax.checkpoint import load_checkpoint, save_weights

    model = Model.create(DISTANCE, seed=2)
    save_weights(model, tmp_path / "w.npz")
    loaded = load_checkpoint(tmp_path / "w.npz")
    assert loaded.config == model.config
    args = _inputs(rng)
    np.testing.assert_array_equal(loaded.module()(*args), model.module()(*args))


@pytest.mark.parametrize("heads", [1, 2])
def test_distance_bias_equals_explicit_bias(rng, heads):
    """The 4 extra query/key features give exactly softmax(q·k/√Dh − |p_i − p_j|²/2σ_h²)."""
    from fdnc_jax.model.layers import EncoderBlock, key_padding_mask

    block = EncoderBlock(16, heads, 32, 0.0, rngs=nnx.Rngs(0), distance_bias=True)
    block.log_sigma[...] = jnp.log(jnp.linspace(0.05, 0.4, heads))  # learned: not the initial ones
    k1, k2 = jax.random.split(rng)
    x = jax.random.normal(k1, (2, 9, 16))
    p = jax.random.normal(k2, (2, 9, 3)) * 0.5
    valid = jnp.arange(9)[None] < jnp.array([[9], [6]])
    mask = key_padding_mask(valid)
    got = block(x, mask, deterministic=True, rngs=None, positions=p)

    att = block.attention
    d2 = jnp.sum((p[:, :, None] - p[:, None]) ** 2, -1)  # [B, L, L]
    bias = -d2[:, None] / (2 * jnp.exp(2 * block.log_sigma[...]))[None, :, None, None]
    h = att.out(nnx.dot_product_attention(att.query(x), att.key(x), att.value(x), bias, mask))
    h = block.norm_attention(x + h)
    want = block.norm_ff(h + block.ff_out(jax.nn.relu(block.ff_in(h))))
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5)
    with pytest.raises(ValueError, match="positions"):
        block(x, mask, deterministic=True, rngs=None)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_head_by_head_attention_gradient_equals_dot_product_attention(rng, batch):
    """The hand-written VJP of the CPU attention gives autodiff's gradients of the standard one
    (padded keys, several heads, key width ≠ value width as with the distance bias)."""
    from fdnc_jax.model.layers import head_by_head_attention, key_padding_mask

    k1, k2, k3, k4 = jax.random.split(rng, 4)
    q, k = (jax.random.normal(key, (*batch, 9, 2, 12)) for key in (k1, k2))
    v = jax.random.normal(k3, (*batch, 9, 2, 8))
    weight = jax.random.normal(k4, (*batch, 9, 2, 8))
    valid = jnp.broadcast_to(jnp.arange(9) < 6, (*batch, 9))
    mask = key_padding_mask(valid.reshape(-1, 9)).reshape(*batch, 1, 1, 9)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weight * fn(q, k, v, mask=mask, deterministic=True))

    want = jax.grad(loss(_standard_attention), (0, 1, 2))(q, k, v)
    got = jax.grad(loss(head_by_head_attention), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    if jax.default_backend() == "cpu":  # The hand-written VJP ran, not autodiff of the lax.map.
        jaxpr = str(jax.make_jaxpr(jax.grad(loss(head_by_head_attention)))(q, k, v))
        assert "scan" not in jaxpr and "dot_general" in jaxpr


def _standard_attention(q, k, v, mask, deterministic):
    """nnx.dot_product_attention for values narrower than queries/keys: padded, then sliced."""
    pad = jnp.zeros((*v.shape[:-1], q.shape[-1] - v.shape[-1]))
    out = nnx.dot_product_attention(
        q, k, jnp.concatenate([v, pad], -1), mask=mask, deterministic=deterministic
    )
    return out[..., : v.shape[-1]]
