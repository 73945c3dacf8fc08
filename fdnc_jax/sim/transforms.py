"""Semi-synthetic worm transforms: pure functions of ONE worm, batched with ``jax.vmap``.

Letters: P padded slots of one worm, C color channels, K warp bumps, G centerline grid samples,
Q candidate outliers, D polynomial degree + 1.

Every transform has the signature ``f(key, xyz, mask, labels, cfg) -> (xyz, mask, labels)``:
  xyz: [P, 3] float32, model units ((µm / 0.42 − median px) / 200), x ≈ anterior–posterior.
  mask: [P] bool, which slots hold a point.
  labels: [P] int32, source neuron index (≥ 0), −2 outlier, −3 empty slot.
  cfg: a ``SimConfig`` (static under jit).
Arrays keep their size; transforms never reorder slots except ``shuffle`` (use ``shuffle_order``
with the same key to permute per-point data such as color). Empty slots are inert: nothing valid
depends on their content. Deterministic transforms (``straighten``, ``recenter``) ignore ``key``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fdnc_jax.sim.config import SimConfig
from fdnc_jax.types import OUTLIER, PADDING
from fdnc_jax.worm import MODEL_SCALE_PX, UM_PER_PX

Array = jax.Array
Cloud = tuple[Array, Array, Array]

UM_PER_UNIT = UM_PER_PX * MODEL_SCALE_PX  # 84 µm per model unit.


def um_to_units(um: float) -> float:
    """Converts a length in µm to model units (÷ 0.42 µm/px ÷ 200 px/unit).

    Example:
      >>> round(um_to_units(84.0), 6)  # 84 µm = 200 px = 1 model unit
      1.0
    """
    return um / UM_PER_UNIT


def px_to_units(px: float) -> float:
    """Converts a length in pixels of 0.42 µm to model units (÷ 200).

    Example:
      >>> px_to_units(50.0)
      0.25
    """
    return px / MODEL_SCALE_PX


# ----------------------------------------------------------------------------------------- helpers


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean over valid rows.

    Args:
      x: [P, D] values.
      mask: [P] bool.

    Returns:
      [D] the mean of the rows where ``mask`` (0 when none).

    Example:
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])
      >>> masked_mean(x, jnp.array([True, True, False])).tolist()
      [2.0, 3.0]
    """
    w = mask.astype(x.dtype)[:, None]  # [P, 1]
    total = jnp.sum(jnp.where(mask[:, None], x, 0.0), axis=0)  # [D]
    return total / jnp.maximum(jnp.sum(w), 1.0)


def _order_key(x: Array) -> Array:
    """Maps float32 to int32 keys with the same order (int sorts are much faster on CPU)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _from_order_key(k: Array) -> Array:
    """Inverse of ``_order_key``."""
    i = jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k)
    return jax.lax.bitcast_convert_type(i, jnp.float32)


def masked_median(x: Array, mask: Array) -> Array:
    """Per-column median over valid rows (numpy's convention: mean of the two middle values).

    Args:
      x: [P, D] float32 values (finite where ``mask``).
      mask: [P] bool.

    Returns:
      [D] the median of the rows where ``mask`` (0 when none).

    Example:
      >>> x = jnp.array([[1.0], [5.0], [2.0], [9.0]])
      >>> masked_median(x, jnp.array([True, True, True, False])).tolist()
      [2.0]
    """
    n = jnp.sum(mask.astype(jnp.int32))
    big = jnp.int32(jnp.iinfo(jnp.int32).max)
    # [P, D] valid values first (as order-preserving int keys), padding last.
    s = jnp.sort(jnp.where(mask[:, None], _order_key(x), big), axis=0)
    lo = jnp.maximum((n - 1) // 2, 0)
    hi = jnp.maximum(n // 2, 0)
    med = 0.5 * (_from_order_key(s[lo]) + _from_order_key(s[hi]))
    return jnp.where(n > 0, med, jnp.zeros_like(med))


def _bounding_box(xyz: Array, mask: Array) -> tuple[Array, Array]:
    """Per-axis min and max of the valid points: two [3] arrays (0 when there are none)."""
    lo = jnp.min(jnp.where(mask[:, None], xyz, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(mask[:, None], xyz, -jnp.inf), axis=0)
    none = ~jnp.any(mask)
    return jnp.where(none, 0.0, lo), jnp.where(none, 0.0, hi)


def select_valid(u: Array, mask: Array) -> Array:
    """Maps uniforms to uniformly chosen valid slots (the ⌊u·n⌋-th valid slot).

    Args:
      u: [K] uniforms in [0, 1).
      mask: [P] bool with n ≥ 1 valid slots.

    Returns:
      [K] int32 slot indices.

    Example:
      >>> select_valid(jnp.array([0.0, 0.5, 0.99]), jnp.array([False, True, False, True])).tolist()
      [1, 3, 3]
    """
    count = jnp.cumsum(mask.astype(jnp.int32))  # [P]
    j = jnp.floor(u * count[-1]).astype(jnp.int32)  # [K] rank among valid slots
    # [K, P] → number of slots whose running count is ≤ j: the index of the j-th valid slot.
    idx = jnp.sum((count[None, :] <= j[:, None]).astype(jnp.int32), axis=1)
    return jnp.minimum(idx, mask.shape[0] - 1)


def _apply_linear(xyz: Array, m: Array) -> Array:
    """x ↦ M x for every row: [P, 3] @ [3, 3]ᵀ as broadcasts (far faster under vmap on CPU)."""
    return (
        xyz[:, 0:1] * m[None, :, 0] + xyz[:, 1:2] * m[None, :, 1] + xyz[:, 2:3] * m[None, :, 2]
    )


def _sq_dist(a: Array, b: Array, dims: int = 3) -> Array:
    """Squared distances over the first ``dims`` coordinates: [A, 3], [B, 3] → [A, B]."""
    d = (a[:, 0][:, None] - b[:, 0][None, :]) ** 2
    for c in range(1, dims):  # over coordinates, not points
        d = d + (a[:, c][:, None] - b[:, c][None, :]) ** 2
    return d


def _draw(key: Array, n: int) -> Array:
    """[n] U(0, 1) draws.

    Each transform makes exactly one draw and slices it: on CPU every threefry call is a small while
    loop whose fixed cost dominates, so fewer, larger calls are much faster.
    """
    return jax.random.uniform(key, (n,))


def _sym(u: Array, v: float) -> Array:
    """Maps U(0, 1) draws to U(−v, v)."""
    return (2.0 * u - 1.0) * v


def _normal(u: Array) -> Array:
    """Maps U(0, 1) draws to N(0, 1) (inverse CDF, as ``jax.random.normal``)."""
    lo = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    return jnp.sqrt(2.0) * jax.scipy.special.erfinv(jnp.clip(2.0 * u - 1.0, lo, 1.0 - 1e-7))


def _rot_x(theta: Array) -> Array:
    c, s = jnp.cos(theta), jnp.sin(theta)
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    return jnp.stack([
        jnp.stack([one, zero, zero]),
        jnp.stack([zero, c, -s]),
        jnp.stack([zero, s, c]),
    ])


def _rot_z(theta: Array) -> Array:
    c, s = jnp.cos(theta), jnp.sin(theta)
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    return jnp.stack([
        jnp.stack([c, -s, zero]),
        jnp.stack([s, c, zero]),
        jnp.stack([zero, zero, one]),
    ])


def _polyfit(x: Array, y: Array, mask: Array, degree: int) -> Array:
    """Masked least-squares polynomial fit of each column of y on x.

    Args:
      x: [P] abscissa.
      y: [P, E] ordinates.
      mask: [P] bool, rows used.
      degree: polynomial degree.

    Returns:
      [P, E] the fitted values at every x.
    """
    powers = [jnp.ones_like(x)]
    for _ in range(degree):  # over powers, not points
        powers.append(powers[-1] * x)
    v = jnp.stack(powers, axis=1)  # [P, D] Vandermonde matrix: 1, x, x², ...
    vw = jnp.where(mask[:, None], v, 0.0)  # [P, D]
    a = vw.T @ vw  # [D, D]
    a = a + 1e-6 * jnp.trace(a) / (degree + 1) * jnp.eye(degree + 1, dtype=x.dtype)
    b = vw.T @ jnp.where(mask[:, None], y, 0.0)  # [D, E]
    coef = jnp.linalg.solve(a, b)  # [D, E]
    return v @ coef


# -------------------------------------------------------------------------------------- transforms


def straighten(key: Array | None, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Straightens a worm without a centerline (deterministic; ``key`` is ignored).

    Rotates about z so the principal axis of the valid points in xy lies on +x (no reflection),
    centres x at the points' mean, fits y(x) and z(x) by masked least squares with a polynomial of
    degree ``cfg.straighten_degree`` and subtracts it: the points then lie around the x axis.

    Args:
      key: unused (any value, or None).
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``straighten_degree``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> x = jnp.linspace(-0.5, 0.5, 8)
      >>> xyz = jnp.stack([x, 0.3 * x**2, jnp.zeros(8)], axis=1)  # a bent worm, [P, 3]
      >>> f = jax.jit(straighten, static_argnames="cfg")
      >>> out, _, _ = f(None, xyz, jnp.ones(8, bool), jnp.arange(8), cfg=SimConfig())
      >>> float(jnp.abs(out[:, 1:]).max()) < 1e-3  # now along the x axis
      True
    """
    del key
    c = masked_mean(xyz, mask)  # [3]
    d = jnp.where(mask[:, None], xyz - c[None, :], 0.0)  # [P, 3]
    sxx = jnp.sum(d[:, 0] * d[:, 0])
    syy = jnp.sum(d[:, 1] * d[:, 1])
    sxy = jnp.sum(d[:, 0] * d[:, 1])
    # Major-axis angle of the 2×2 covariance, in (−π/2, π/2]: the axis has cos φ ≥ 0.
    phi = 0.5 * jnp.arctan2(2.0 * sxy, sxx - syy)
    out = _apply_linear(xyz - c[None, :], _rot_z(-phi))  # [P, 3]
    x = out[:, 0]  # [P]
    curve = _polyfit(x, out[:, 1:], mask, cfg.straighten_degree)  # [P, 2]
    out = jnp.concatenate([x[:, None], out[:, 1:] - curve], axis=1)
    return out, mask, labels


def random_bend(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Bends the straight x axis onto a random smooth curve in the xy plane (arc length kept).

    The centerline has curvature κ(s) = κ0 + κ1·s / 100 µm with κ0 ~ U(±bend_curvature_per_mm) and
    κ1 ~ U(±bend_curvature_change_per_mm); it passes through the origin along +x at s = 0. A point
    (x, y, z) moves to C(x) + y·N(x) + z·ẑ, with C the curve and N its normal.

    Args:
      key: PRNG key.
      xyz: [P, 3] model units, worm roughly along x and centred near x = 0.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``bend_curvature_per_mm``, ``bend_curvature_change_per_mm``, ``bend_grid_size``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jnp.stack([jnp.linspace(-0.5, 0.5, 8), jnp.zeros(8), jnp.zeros(8)], axis=1)
      >>> f = jax.jit(random_bend, static_argnames="cfg")
      >>> out, _, _ = f(jax.random.key(0), xyz, jnp.ones(8, bool), jnp.arange(8), cfg=SimConfig())
      >>> out.shape, bool(jnp.abs(out[:, 1]).max() > 0)  # bent in the xy plane
      ((8, 3), True)
    """
    u = _draw(key, 2)
    per_mm = UM_PER_UNIT / 1000.0  # 1/mm → 1/unit
    k0 = _sym(u[0], cfg.bend_curvature_per_mm) * per_mm
    k1 = _sym(u[1], cfg.bend_curvature_change_per_mm) * per_mm / um_to_units(100.0)
    x, y = xyz[:, 0], xyz[:, 1]
    half = jnp.max(jnp.where(mask, jnp.abs(x), 0.0)) + 1e-3
    g = cfg.bend_grid_size | 1  # odd: s = 0 is a grid point
    s = jnp.linspace(-half, half, g)  # [G]
    theta = k0 * s + 0.5 * k1 * s * s  # [G]
    tangent = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=1)  # [G, 2]
    # [G, 2] cumulative trapezoid integral of the tangent, zero at s = 0.
    steps = 0.5 * (tangent[1:] + tangent[:-1]) * (s[1] - s[0])
    curve = jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(steps, axis=0)], axis=0)
    curve = curve - curve[g // 2][None, :]
    # Linear interpolation on the uniform grid (jnp.interp's search is slow under vmap on CPU).
    t = jnp.clip((x + half) / (s[1] - s[0]), 0.0, g - 1.0)  # [P] fractional grid index
    i0 = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, g - 2)  # [P]
    w = (t - i0)[:, None]  # [P, 1]
    c = curve[i0] * (1.0 - w) + curve[i0 + 1] * w  # [P, 2]
    cx, cy = c[:, 0], c[:, 1]
    th = k0 * x + 0.5 * k1 * x * x  # [P]
    bent = jnp.stack([cx - y * jnp.sin(th), cy + y * jnp.cos(th), xyz[:, 2]], axis=1)  # [P, 3]
    return jnp.where(mask[:, None], bent, xyz), mask, labels


def smooth_warp(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Adds a random smooth displacement field: a sum of Gaussian bumps (the form of a CPD morph).

    ``cfg.warp_num_bumps`` bumps of width ``warp_length_um`` are centred uniformly in the valid
    points' bounding box, each with a N(0, 1) displacement vector; the field is scaled so that its
    RMS per axis over the valid points is exactly ``warp_amplitude_um`` (the direction pattern is
    random, the size is not).

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``warp_amplitude_um``, ``warp_length_um``, ``warp_num_bumps``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.ones(8, bool), jnp.arange(8, dtype=jnp.int32)
      >>> f = jax.jit(smooth_warp, static_argnames="cfg")
      >>> out, _, _ = f(jax.random.key(0), xyz, mask, labels, cfg=SimConfig())
      >>> round(float(jnp.sqrt(jnp.mean((out - xyz) ** 2))) * UM_PER_UNIT, 2)  # RMS, µm
      4.5
    """
    k = cfg.warp_num_bumps
    u = _draw(key, 6 * k).reshape(2, k, 3)
    lo, hi = _bounding_box(xyz, mask)
    centres = lo[None, :] + u[0] * (hi - lo)[None, :]  # [K, 3]
    weights = _normal(u[1])  # [K, 3]
    # Materialise: otherwise XLA recomputes the random draws for every (point, bump) pair.
    centres, weights = jax.lax.optimization_barrier((centres, weights))
    ell = um_to_units(cfg.warp_length_um)
    d2 = _sq_dist(xyz, centres)  # [P, K]
    g = jnp.exp(-0.5 * d2 / ell**2)  # [P, K]
    field = g @ weights  # [P, 3]
    rms = jnp.sqrt(jnp.mean(masked_mean(field * field, mask)))
    field = field * (um_to_units(cfg.warp_amplitude_um) / jnp.maximum(rms, 1e-12))
    return jnp.where(mask[:, None], xyz + field, xyz), mask, labels


def rotate_yz(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Rotates about the AP (x) axis by θ ~ U(±rotate_yz_max), then shears yz (each ~ U(±shear_yz)).

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``rotate_yz_max``, ``shear_yz``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> out, _, _ = rotate_yz(jax.random.key(0), xyz, mask, labels, SimConfig())
      >>> bool(jnp.allclose(out[:, 0], xyz[:, 0]))  # x (anterior–posterior) is kept
      True
    """
    u = _draw(key, 3)
    theta = _sym(u[0], cfg.rotate_yz_max)
    a, b = _sym(u[1], cfg.shear_yz), _sym(u[2], cfg.shear_yz)
    shear = jnp.eye(3).at[1, 2].set(a).at[2, 1].set(b)
    return _apply_linear(xyz, shear @ _rot_x(theta)), mask, labels


def rotate_xy(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Rotates about the optical (z) axis by θ ~ U(±rotate_xy_max) (π: any heading).

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``rotate_xy_max``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> out, _, _ = rotate_xy(jax.random.key(0), xyz, mask, labels, SimConfig())
      >>> bool(jnp.allclose(out[:, 2], xyz[:, 2]))  # z (optical axis) is kept
      True
    """
    theta = _sym(_draw(key, 1)[0], cfg.rotate_xy_max)
    return _apply_linear(xyz, _rot_z(theta)), mask, labels


def scale(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Scales each axis by 1 + U(±cfg.scale).

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``scale``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> out, _, _ = scale(jax.random.key(0), xyz, mask, labels, SimConfig(scale=0.05))
      >>> bool(jnp.all(jnp.abs(out / xyz - 1.0) <= 0.05))
      True
    """
    factors = 1.0 + _sym(_draw(key, 3), cfg.scale)  # [3]
    return xyz * factors[None, :], mask, labels


def shear_xy(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Shears the xy plane: x += a·y, y += b·x with a, b ~ U(±cfg.shear_xy).

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``shear_xy``.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> out, _, _ = shear_xy(jax.random.key(0), xyz, mask, labels, SimConfig())
      >>> bool(jnp.allclose(out[:, 2], xyz[:, 2]))  # z is kept
      True
    """
    a, b = _sym(_draw(key, 2), cfg.shear_xy)
    m = jnp.eye(3).at[0, 1].set(a).at[1, 0].set(b)
    return _apply_linear(xyz, m), mask, labels


def drop_points(
    key: Array,
    xyz: Array,
    mask: Array,
    labels: Array,
    cfg: SimConfig,
    rate: Array | float | None = None,
) -> Cloud:
    """Drops neurons: p ~ U(cfg.p_drop), each valid point kept with probability 1 − p.

    At least ``cfg.min_points`` points are kept (or all, when the worm has fewer): when the draw
    keeps too few, the first ``min_points`` valid slots are kept as well. Dropped slots become empty
    (mask False, label −3).

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``p_drop``, ``min_points``.
      rate: optional drop probability to use instead of drawing one (``synthesize`` shares it with
        ``add_outliers``).

    Returns:
      (xyz [P, 3] unchanged, mask [P], labels [P]).

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> f = jax.jit(drop_points, static_argnames="cfg")
      >>> _, keep, new_labels = f(jax.random.key(0), xyz, mask, labels, cfg=SimConfig())
      >>> bool(jnp.all((new_labels == -3) == ~keep)), int(keep.sum()) <= 6
      (True, True)
    """
    u = _draw(key, mask.shape[0] + 1)
    if rate is None:
        lo, hi = cfg.p_drop
        rate = lo + u[-1] * (hi - lo)
    keep = mask & (u[:-1] >= rate)  # [P]
    # Rare fallback (cheaper than a top-k on CPU): too few kept → also keep the first valid slots.
    short = jnp.sum(keep.astype(jnp.int32)) < cfg.min_points
    first = mask & (jnp.cumsum(mask.astype(jnp.int32)) <= cfg.min_points)  # [P]
    keep = keep | (short & first)
    return xyz, keep, jnp.where(keep, labels, PADDING)


def add_outliers(
    key: Array,
    xyz: Array,
    mask: Array,
    labels: Array,
    cfg: SimConfig,
    rate: Array | float | None = None,
) -> Cloud:
    """Adds false detections (label −2) into empty slots.

    k ~ randint(max(1, min(max_outliers, ⌊n·rate⌋))) (numpy's exclusive upper bound, as the
    original),
    n the number of valid points. ``cfg.outlier_candidates`` positions are drawn uniformly in the
    valid points' bounding box grown by ``outlier_margin_px`` (for a straightened 200 px head ~±30
    px thick this is the original box x ∈ [−50, 250], y, z ∈ [−60, 60] px); those closer than
    ``outlier_min_dist_px`` in xy to a valid point are rejected and the first k accepted ones fill
    the first empty slots. Fewer are added when there are not enough empty slots or accepted
    candidates.

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``max_outliers``, ``outlier_candidates``, ``outlier_min_dist_px``,
        ``outlier_margin_px``, ``p_drop`` (when ``rate`` is None).
      rate: the outlier rate (the drop probability in the original); drawn from ``p_drop`` if None.

    Returns:
      (xyz [P, 3], mask [P], labels [P]) with the outliers written into formerly empty slots.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (40, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(40) < 30, jnp.arange(40, dtype=jnp.int32)
      >>> f = jax.jit(add_outliers, static_argnames="cfg")
      >>> _, new_mask, new_labels = f(jax.random.key(0), xyz, mask, labels, SimConfig(), 0.2)
      >>> int(jnp.sum(new_labels == -2)) == int(new_mask.sum()) - 30  # new slots hold outliers
      True
    """
    if cfg.max_outliers == 0 or cfg.outlier_candidates == 0:
        return xyz, mask, labels
    q = cfg.outlier_candidates
    draw = _draw(key, 3 * q + 2)
    if rate is None:
        lo, hi = cfg.p_drop
        rate = lo + draw[-2] * (hi - lo)
    n = jnp.sum(mask.astype(jnp.int32))
    hi_k = jnp.maximum(1, jnp.minimum(cfg.max_outliers, jnp.floor(n * rate).astype(jnp.int32)))
    k = jnp.minimum(jnp.floor(draw[-1] * hi_k).astype(jnp.int32), hi_k - 1)  # randint(hi_k)
    margin = jnp.array([px_to_units(v) for v in cfg.outlier_margin_px])  # [3]
    box_lo, box_hi = _bounding_box(xyz, mask)
    box_lo, box_hi = box_lo - margin, box_hi + margin
    u = draw[: 3 * q].reshape(q, 3)  # [Q, 3]
    cand = box_lo[None, :] + u * (box_hi - box_lo)[None, :]  # [Q, 3]
    # Materialise the candidates: otherwise XLA recomputes them for every (candidate, point) pair.
    cand = jax.lax.optimization_barrier(cand)
    # Empty slots moved far away (cheaper than masking the [P, Q] distances: XLA then fuses the
    # distance computation into the min-reduction instead of materialising it).
    far = jnp.where(mask[:, None], xyz, 1e4)  # [P, 3]
    d2 = jnp.min(_sq_dist(far, cand, dims=2), axis=0)  # [Q] squared xy distance to the nearest
    accepted = d2 >= px_to_units(cfg.outlier_min_dist_px) ** 2  # [Q]
    count = jnp.cumsum(accepted.astype(jnp.int32))  # [Q] accepted so far
    j = jnp.arange(cfg.max_outliers, dtype=jnp.int32)  # [R]
    # [R] index of the j-th accepted candidate, in draw order (compare-and-count: no scatter).
    pick = jnp.sum((count[None, :] <= j[:, None]).astype(jnp.int32), axis=1)
    points = cand[jnp.minimum(pick, q - 1)]  # [R, 3]
    n_out = jnp.minimum(k, count[-1])
    free = ~mask
    rank = jnp.cumsum(free.astype(jnp.int32)) - 1  # [P] index among empty slots
    put = free & (rank < n_out)  # [P]
    # Empty slot of rank r receives outlier r.
    new = points[jnp.clip(rank, 0, cfg.max_outliers - 1)]  # [P, 3]
    new_xyz = jnp.where(put[:, None], new, xyz)
    return new_xyz, mask | put, jnp.where(put, OUTLIER, labels)


def jitter(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Adds independent Gaussian noise of std ``cfg.jitter_um`` (µm) to every valid coordinate.

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``jitter_um`` (0: identity).

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> out, _, _ = jitter(jax.random.key(0), xyz, mask, labels, SimConfig(jitter_um=1.0))
      >>> bool(jnp.all(out[6:] == xyz[6:])), bool(jnp.all(out[:6] != xyz[:6]))  # valid rows move
      (True, True)
    """
    if cfg.jitter_um == 0:
        return xyz, mask, labels
    noise = jax.random.normal(key, xyz.shape) * um_to_units(cfg.jitter_um)  # [P, 3]
    return jnp.where(mask[:, None], xyz + noise, xyz), mask, labels


def recenter(key: Array | None, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Subtracts the per-axis median of the valid points (deterministic; ``key`` is ignored).

    Args:
      key: unused.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: unused.

    Returns:
      (xyz [P, 3], mask, labels), mask and labels unchanged.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> f = jax.jit(recenter, static_argnames="cfg")
      >>> out, _, _ = f(None, xyz, mask, labels, cfg=SimConfig())
      >>> bool(jnp.allclose(masked_median(out, mask), 0.0, atol=1e-6))
      True
    """
    del key, cfg
    return xyz - masked_median(xyz, mask)[None, :], mask, labels


def shuffle_order(key: Array, num_points: int) -> Array:
    """The slot permutation ``shuffle`` applies with this key.

    Args:
      key: PRNG key (the one given to ``shuffle``).
      num_points: P.

    Returns:
      [P] int32 permutation: new slot i holds old slot ``order[i]``.

    Example:
      >>> sorted(shuffle_order(jax.random.key(0), 5).tolist())
      [0, 1, 2, 3, 4]
    """
    # Sort random keys with the slot index packed into the low bits: one int sort (fast on CPU).
    # Ties of the 32 − ⌈log2 P⌉ random bits keep slot order (probability ~P²/2³³, negligible).
    nb = max(1, (num_points - 1).bit_length())
    if nb > 24:
        return jax.random.permutation(key, num_points)
    bits = jax.random.bits(key, (num_points,), jnp.uint32)
    packed = (bits >> nb << nb) | jnp.arange(num_points, dtype=jnp.uint32)  # [P]
    low = jnp.uint32((1 << nb) - 1)
    return (jnp.sort(packed) & low).astype(jnp.int32)


def shuffle(key: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """Randomly permutes the slots (a no-op when ``cfg.shuffle`` is False).

    Per-point data carried alongside (color) must be permuted with ``shuffle_order(key, P)``.

    Args:
      key: PRNG key.
      xyz: [P, 3] model units.
      mask: [P] bool.
      labels: [P] int32.
      cfg: uses ``shuffle``.

    Returns:
      (xyz [P, 3], mask [P], labels [P]) permuted together.

    Example:
      >>> xyz = jax.random.normal(jax.random.key(0), (8, 3)) * 0.3  # [P, 3] model units
      >>> mask, labels = jnp.arange(8) < 6, jnp.arange(8, dtype=jnp.int32)
      >>> f = jax.jit(shuffle, static_argnames="cfg")
      >>> out, _, new_labels = f(jax.random.key(0), xyz, mask, labels, cfg=SimConfig())
      >>> bool(jnp.all(out == xyz[new_labels]))  # labels follow their points
      True
    """
    if not cfg.shuffle:
        return xyz, mask, labels
    order = shuffle_order(key, mask.shape[0])
    return xyz[order], mask[order], labels[order]
