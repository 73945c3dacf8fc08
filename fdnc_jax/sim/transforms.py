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

Implementation: each public transform is a thin wrapper around a private core ``_name(u, pts, mask,
labels, cfg)`` that takes its U(0, 1) draws ``u`` already drawn and the points transposed, ``pts``
[3, P] (one row per axis: under ``vmap`` on CPU the slot axis is then the contiguous, vectorised
one, where [P, 3] wastes most of every vector on the 3-long minor axis). ``pairs._synthesize``
chains the cores on one slice per copy of a single draw of random bits for the whole batch.
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
    return _mean_rows(x.T, mask)


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
    return _median_rows(x.T, mask)


def _median_rows(x: Array, mask: Array) -> Array:
    """``masked_median`` on transposed points: x [D, P] float32, mask [P] → [D].

    Exact selection by bisection on the bits (no sort: a sort of P slots costs about twice as much
    on CPU): the k-th smallest value is the largest v with fewer than k + 1 values below it, found
    bit by bit from the top in 32 vectorised compare-and-count passes over the P slots.
    """
    n = jnp.sum(mask.astype(jnp.int32))
    lo = jnp.maximum((n - 1) // 2, 0)  # the two middle ranks (equal when n is odd)
    hi = jnp.maximum(n // 2, 0)
    top = jnp.uint32(0xFFFFFFFF)
    u = jnp.where(mask[None, :], _unsigned_order_key(x), top)  # [D, P], padding above all values
    r = jnp.zeros(x.shape[:1], jnp.uint32)  # [D]
    for bit in range(31, -1, -1):  # over key bits, not points
        cand = r | jnp.uint32(1 << bit)
        # [D] values below (a float sum, exact below 2²⁴: faster than an int one on CPU).
        below = jnp.sum(jnp.where(u < cand[:, None], 1.0, 0.0), axis=1)
        r = jnp.where(below <= lo, cand, r)
    # Rank hi: the same value when enough values equal it, else the next larger value.
    at_most = jnp.sum((u <= r[:, None]).astype(jnp.int32), axis=1)  # [D]
    above = jnp.min(jnp.where(u > r[:, None], u, top), axis=1)  # [D]
    r_hi = jnp.where(at_most > hi, r, above)
    med = 0.5 * (_from_unsigned_order_key(r) + _from_unsigned_order_key(r_hi))
    return jnp.where(n > 0, med, jnp.zeros_like(med))


def _unsigned_order_key(x: Array) -> Array:
    """Maps float32 to uint32 keys with the same order (finite values stay below 0xFFFFFFFF)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where((b & sign) != 0, ~b, b | sign)


def _from_unsigned_order_key(k: Array) -> Array:
    """Inverse of ``_unsigned_order_key``."""
    sign = jnp.uint32(0x80000000)
    b = jnp.where((k & sign) != 0, k ^ sign, ~k)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _bounding_box(pts: Array, mask: Array) -> tuple[Array, Array]:
    """Per-axis min and max of the valid points of pts [3, P]: two [3] arrays (0 when none)."""
    lo = jnp.min(jnp.where(mask[None, :], pts, jnp.inf), axis=1)
    hi = jnp.max(jnp.where(mask[None, :], pts, -jnp.inf), axis=1)
    none = ~jnp.any(mask)
    return jnp.where(none, 0.0, lo), jnp.where(none, 0.0, hi)


def _mean_rows(pts: Array, mask: Array) -> Array:
    """``masked_mean`` on transposed points: [D] mean of the valid columns of pts [D, P] (0 when
    none)."""
    total = jnp.sum(jnp.where(mask[None, :], pts, 0.0), axis=1)
    return total / jnp.maximum(jnp.sum(mask.astype(pts.dtype)), 1.0)


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


def _apply_linear(pts: Array, m: Array) -> Array:
    """x ↦ M x for every column of pts [3, P] (M [3, 3]) as broadcasts (far faster under vmap on
    CPU than a batch of tiny matmuls)."""
    return m[:, 0:1] * pts[0:1] + m[:, 1:2] * pts[1:2] + m[:, 2:3] * pts[2:3]


def _sq_dist(a: Array, b: Array, dims: int = 3) -> Array:
    """Squared distances over the first ``dims`` rows: [3, A], [3, B] → [A, B]."""
    d = (a[0][:, None] - b[0][None, :]) ** 2
    for c in range(1, dims):  # over coordinates, not points
        d = d + (a[c][:, None] - b[c][None, :]) ** 2
    return d


def _draw(key: Array, n: int) -> Array:
    """[n] U(0, 1) draws.

    Each transform makes exactly one draw and slices it: on CPU every threefry call is a small while
    loop whose fixed cost dominates, so fewer, larger calls are much faster (``pairs._synthesize``
    makes one draw for a whole copy).
    """
    return bits_to_uniform(random_bits(key, n))


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def random_bits(key: Array, n: int) -> Array:
    """[n] uint32 random bits: ``jax.random.bits(key, (n,))``, bit for bit, but faster on CPU.

    For a threefry key (JAX's default) with ``jax_threefry_partitionable`` on (the default) and
    n < 2³², the threefry-2x32 hash of the counters 0 … n − 1 is written out unrolled: XLA's CPU lowering of
    ``jax.random.bits`` runs its 5 blocks of rounds as a while loop (a dozen small ops per block,
    each a separate step of the CPU runtime), where the unrolled hash fuses into one vectorised
    loop. Other keys fall back to ``jax.random.bits``.

    Args:
      key: PRNG key.
      n: number of 32-bit words.

    Returns:
      [n] uint32.

    Example:
      >>> key = jax.random.key(0)
      >>> bool(jnp.all(random_bits(key, 5) == jax.random.bits(key, (5,), jnp.uint32)))
      True
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    threefry = typed and str(jax.random.key_impl(key)) == "threefry2x32"
    if not (threefry and jax.config.jax_threefry_partitionable and n < 2**32):
        return jax.random.bits(key, (n,), jnp.uint32)
    k = jax.random.key_data(key)
    ks = (k[0], k[1], k[0] ^ k[1] ^ jnp.uint32(0x1BD11BDA))
    # Counters (high word, low word) = (0, i), as jax.random.bits numbers the words.
    x0 = jnp.zeros((n,), jnp.uint32) + ks[0]
    x1 = jnp.arange(n, dtype=jnp.uint32) + ks[1]
    for block in range(5):  # the 5 blocks of 4 rounds, unrolled (not a loop over data)
        for rot in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(rot)) | (x1 >> jnp.uint32(32 - rot))
            x1 = x0 ^ x1
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + jnp.uint32(block + 1)
    # Materialise the hash: XLA's CPU compiler would otherwise fuse these cheap integer ops into
    # every consumer and recompute them there, once per element of the broadcasts that read the
    # draws ([P, K], [P, Q], ...; an optimization_barrier is dropped on CPU). A dynamic update at
    # an offset the compiler cannot fold (always 0) is not fused into its consumers.
    zero = (k[0] >> jnp.uint32(31)) >> jnp.uint32(1)
    buf = jax.lax.dynamic_update_slice(jnp.zeros((n + 1,), jnp.uint32), x0 ^ x1, (zero,))
    return buf[:n]


def bits_to_uniform(bits: Array) -> Array:
    """Maps uint32 random bits to U(0, 1) float32 draws (23 bits each, as ``jax.random.uniform``).

    Example:
      >>> bits_to_uniform(jnp.array([0, 2**31, 2**32 - 1], jnp.uint32)).tolist()
      [0.0, 0.5, 0.9999998807907104]
    """
    mantissa = (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


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
    return jnp.stack(
        [
            jnp.stack([one, zero, zero]),
            jnp.stack([zero, c, -s]),
            jnp.stack([zero, s, c]),
        ]
    )


def _rot_z(theta: Array) -> Array:
    c, s = jnp.cos(theta), jnp.sin(theta)
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    return jnp.stack(
        [
            jnp.stack([c, -s, zero]),
            jnp.stack([s, c, zero]),
            jnp.stack([zero, zero, one]),
        ]
    )


def _polyfit(x: Array, y: Array, mask: Array, degree: int) -> Array:
    """Masked least-squares polynomial fit of each row of y on x.

    Args:
      x: [P] abscissa.
      y: [E, P] ordinates.
      mask: [P] bool, columns used.
      degree: polynomial degree.

    Returns:
      [E, P] the fitted values at every x.
    """
    powers = [jnp.ones_like(x)]
    for _ in range(degree):  # over powers, not points
        powers.append(powers[-1] * x)
    v = jnp.stack(powers, axis=0)  # [D, P] Vandermonde matrix: 1, x, x², ...
    vw = jnp.where(mask[None, :], v, 0.0)  # [D, P]
    a = vw @ vw.T  # [D, D]
    a = a + 1e-6 * jnp.trace(a) / (degree + 1) * jnp.eye(degree + 1, dtype=x.dtype)
    b = vw @ jnp.where(mask[None, :], y, 0.0).T  # [D, E]
    coef = jnp.linalg.solve(a, b)  # [D, E]
    return coef.T @ v


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
    return _straighten(xyz.T, mask, cfg).T, mask, labels


def _straighten(pts: Array, mask: Array, cfg: SimConfig) -> Array:
    """``straighten`` core: pts [3, P] → [3, P]."""
    c = _mean_rows(pts, mask)  # [3]
    d = jnp.where(mask[None, :], pts - c[:, None], 0.0)  # [3, P]
    sxx = jnp.sum(d[0] * d[0])
    syy = jnp.sum(d[1] * d[1])
    sxy = jnp.sum(d[0] * d[1])
    # Major-axis angle of the 2×2 covariance, in (−π/2, π/2]: the axis has cos φ ≥ 0.
    phi = 0.5 * jnp.arctan2(2.0 * sxy, sxx - syy)
    out = _apply_linear(pts - c[:, None], _rot_z(-phi))  # [3, P]
    x = out[0]  # [P]
    curve = _polyfit(x, out[1:], mask, cfg.straighten_degree)  # [2, P]
    return jnp.concatenate([x[None, :], out[1:] - curve], axis=0)


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
    out, mask, labels = _random_bend(_draw(key, BEND_DRAWS), xyz.T, mask, labels, cfg)
    return out.T, mask, labels


BEND_DRAWS = 2  # uniforms used by ``random_bend``


def _random_bend(u: Array, pts: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """``random_bend`` core: u [2] uniforms, pts [3, P]."""
    per_mm = UM_PER_UNIT / 1000.0  # 1/mm → 1/unit
    k0 = _sym(u[0], cfg.bend_curvature_per_mm) * per_mm
    k1 = _sym(u[1], cfg.bend_curvature_change_per_mm) * per_mm / um_to_units(100.0)
    x, y = pts[0], pts[1]
    half = jnp.max(jnp.where(mask, jnp.abs(x), 0.0)) + 1e-3
    g = cfg.bend_grid_size | 1  # odd: s = 0 is a grid point
    s = jnp.linspace(-half, half, g)  # [G]
    theta = k0 * s + 0.5 * k1 * s * s  # [G]
    tangent = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=1)  # [G, 2]
    # [G, 2] cumulative trapezoid integral of the tangent, zero at s = 0.
    steps = 0.5 * (tangent[1:] + tangent[:-1]) * (s[1] - s[0])
    curve = jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(steps, axis=0)], axis=0)
    curve = curve - curve[g // 2][None, :]
    # [G − 1, 4] each grid interval's two end points: one gather serves both interpolation ends.
    ends = jnp.concatenate([curve[:-1], curve[1:]], axis=1)
    # Linear interpolation on the uniform grid (jnp.interp's search is slow under vmap on CPU).
    t = jnp.clip((x + half) / (s[1] - s[0]), 0.0, g - 1.0)  # [P] fractional grid index
    i0 = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, g - 2)  # [P]
    w = t - i0  # [P]
    e = ends[i0]  # [P, 4]
    cx = e[:, 0] * (1.0 - w) + e[:, 2] * w  # [P]
    cy = e[:, 1] * (1.0 - w) + e[:, 3] * w
    th = k0 * x + 0.5 * k1 * x * x  # [P]
    # [3, P]: rows x and y replaced (row updates: a concatenation fuses into a slow branchy loop).
    bent_x = jnp.where(mask, cx - y * jnp.sin(th), x)
    bent_y = jnp.where(mask, cy + y * jnp.cos(th), y)
    return pts.at[0].set(bent_x).at[1].set(bent_y), mask, labels


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
    out, mask, labels = _smooth_warp(_draw(key, warp_draws(cfg)), xyz.T, mask, labels, cfg)
    return out.T, mask, labels


def warp_draws(cfg: SimConfig) -> int:
    """Uniforms used by ``smooth_warp``: a centre and a displacement per bump.

    Example:
      >>> warp_draws(SimConfig(warp_num_bumps=4))
      24
    """
    return 6 * cfg.warp_num_bumps


def _smooth_warp(u: Array, pts: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """``smooth_warp`` core: u [6K] uniforms, pts [3, P]."""
    k = cfg.warp_num_bumps
    u = u.reshape(2, 3, k)
    lo, hi = _bounding_box(pts, mask)
    centres = lo[:, None] + u[0] * (hi - lo)[:, None]  # [3, K]
    weights = _normal(u[1])  # [3, K]
    # Materialise: otherwise XLA may recompute the draws for every (point, bump) pair (the CPU
    # compiler drops the barrier; there ``random_bits`` hands over materialised draws).
    centres, weights = jax.lax.optimization_barrier((centres, weights))
    a = -0.5 / um_to_units(cfg.warp_length_um) ** 2
    g = jnp.exp(a * _sq_dist(centres, pts))  # [K, P] (points on the contiguous axis)
    # [3, P] Σ_k weights[:, k] g[k], unrolled over the K bumps (a batch of tiny matmuls is slow).
    field = weights[:, 0:1] * g[None, 0]
    for j in range(1, k):  # over bumps, not points
        field = field + weights[:, j : j + 1] * g[None, j]
    rms = jnp.sqrt(jnp.mean(_mean_rows(field * field, mask)))
    field = field * (um_to_units(cfg.warp_amplitude_um) / jnp.maximum(rms, 1e-12))
    return jnp.where(mask[None, :], pts + field, pts), mask, labels


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
    return _apply_linear(xyz.T, _rotate_yz_matrix(_draw(key, 3), cfg)).T, mask, labels


def _rotate_yz_matrix(u: Array, cfg: SimConfig) -> Array:
    """[3, 3] the map of ``rotate_yz`` from u [3] uniforms."""
    theta = _sym(u[0], cfg.rotate_yz_max)
    a, b = _sym(u[1], cfg.shear_yz), _sym(u[2], cfg.shear_yz)
    shear = jnp.eye(3).at[1, 2].set(a).at[2, 1].set(b)
    return shear @ _rot_x(theta)


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
    return _apply_linear(xyz.T, _rotate_xy_matrix(_draw(key, 1), cfg)).T, mask, labels


def _rotate_xy_matrix(u: Array, cfg: SimConfig) -> Array:
    """[3, 3] the map of ``rotate_xy`` from u [1] uniform."""
    return _rot_z(_sym(u[0], cfg.rotate_xy_max))


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
    return xyz * _scale_factors(_draw(key, 3), cfg)[None, :], mask, labels


def _scale_factors(u: Array, cfg: SimConfig) -> Array:
    """[3] the per-axis factors of ``scale`` from u [3] uniforms."""
    return 1.0 + _sym(u, cfg.scale)


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
    return _apply_linear(xyz.T, _shear_xy_matrix(_draw(key, 2), cfg)).T, mask, labels


def _shear_xy_matrix(u: Array, cfg: SimConfig) -> Array:
    """[3, 3] the map of ``shear_xy`` from u [2] uniforms."""
    a, b = _sym(u, cfg.shear_xy)
    return jnp.eye(3).at[0, 1].set(a).at[1, 0].set(b)


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
    return _drop_points(u[:-1], xyz, mask, labels, cfg, rate)


def _drop_points(u: Array, xyz: Array, mask: Array, labels: Array, cfg: SimConfig, rate) -> Cloud:
    """``drop_points`` core: u [P] uniforms (xyz is passed through in any layout)."""
    keep = mask & (u >= rate)  # [P]
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
    draw = _draw(key, outlier_draws(cfg) + 1)
    if rate is None:
        lo, hi = cfg.p_drop
        rate = lo + draw[-1] * (hi - lo)
    out, mask, labels = _add_outliers(draw[:-1], xyz.T, mask, labels, cfg, rate)
    return out.T, mask, labels


def outlier_draws(cfg: SimConfig) -> int:
    """Uniforms used by ``add_outliers`` (given its rate): 3 per candidate and 1 for the count.

    Example:
      >>> outlier_draws(SimConfig(outlier_candidates=40)), outlier_draws(SimConfig(max_outliers=0))
      (121, 0)
    """
    if cfg.max_outliers == 0 or cfg.outlier_candidates == 0:
        return 0
    return 3 * cfg.outlier_candidates + 1


def _add_outliers(
    draw: Array, pts: Array, mask: Array, labels: Array, cfg: SimConfig, rate
) -> Cloud:
    """``add_outliers`` core: draw [``outlier_draws(cfg)``] uniforms, pts [3, P]."""
    if cfg.max_outliers == 0 or cfg.outlier_candidates == 0:
        return pts, mask, labels
    return _place_outliers(*_outlier_points(draw, pts, mask, cfg, rate), pts, mask, labels, cfg)


def _outlier_points(
    draw: Array, pts: Array, mask: Array, cfg: SimConfig, rate
) -> tuple[Array, Array]:
    """The outliers ``add_outliers`` draws around the valid points of pts [3, N] (any N ≥ the slots
    that can be valid): [3, R] positions in draw order and how many of them to add."""
    q = cfg.outlier_candidates
    n = jnp.sum(mask.astype(jnp.int32))
    hi_k = jnp.maximum(1, jnp.minimum(cfg.max_outliers, jnp.floor(n * rate).astype(jnp.int32)))
    k = jnp.minimum(jnp.floor(draw[-1] * hi_k).astype(jnp.int32), hi_k - 1)  # randint(hi_k)
    margin = jnp.array([px_to_units(v) for v in cfg.outlier_margin_px])  # [3]
    box_lo, box_hi = _bounding_box(pts, mask)
    box_lo, box_hi = box_lo - margin, box_hi + margin
    u = draw[: 3 * q].reshape(3, q)  # [3, Q]
    cand = box_lo[:, None] + u * (box_hi - box_lo)[:, None]  # [3, Q]
    # [Q] no valid point within the minimum xy distance. Empty slots are moved far away, and the
    # test is a boolean reduction (XLA fuses the [N, Q] distances into it; a min-reduction would
    # materialise them first).
    far = jnp.where(mask[None, :], pts[:2], 1e4)  # [2, N]
    min_d2 = px_to_units(cfg.outlier_min_dist_px) ** 2
    accepted = jnp.all(_sq_dist(far, cand, dims=2) >= min_d2, axis=0)  # [Q]
    count = jnp.cumsum(accepted.astype(jnp.int32))  # [Q] accepted so far
    j = jnp.arange(cfg.max_outliers, dtype=jnp.int32)  # [R]
    # [R] index of the j-th accepted candidate, in draw order (compare-and-count: no scatter).
    pick = jnp.minimum(jnp.sum((count[None, :] <= j[:, None]).astype(jnp.int32), axis=1), q - 1)
    return cand[:, pick], jnp.minimum(k, count[-1])


def _place_outliers(
    points: Array, n_out: Array, pts: Array, mask: Array, labels: Array, cfg: SimConfig
) -> Cloud:
    """Writes the first n_out of points [3, R] into the first empty slots of pts [3, P]."""
    free = ~mask
    rank = jnp.cumsum(free.astype(jnp.int32)) - 1  # [P] index among empty slots
    put = free & (rank < n_out)  # [P]
    # Empty slot of rank r receives outlier r.
    new = points[:, jnp.clip(rank, 0, cfg.max_outliers - 1)]  # [3, P]
    new_pts = jnp.where(put[None, :], new, pts)
    return new_pts, mask | put, jnp.where(put, OUTLIER, labels)


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
    u = _draw(key, jitter_draws(mask.shape[0], cfg))
    out, mask, labels = _jitter(u, xyz.T, mask, labels, cfg)
    return out.T, mask, labels


def jitter_draws(num_points: int, cfg: SimConfig) -> int:
    """Uniforms used by ``jitter`` on P = num_points slots: 3 per slot, none when it is off.

    Example:
      >>> jitter_draws(10, SimConfig(jitter_um=1.0)), jitter_draws(10, SimConfig())
      (30, 0)
    """
    return 3 * num_points if cfg.jitter_um > 0 else 0


def _jitter(u: Array, pts: Array, mask: Array, labels: Array, cfg: SimConfig) -> Cloud:
    """``jitter`` core: u [3P] uniforms, pts [3, P]."""
    if cfg.jitter_um == 0:
        return pts, mask, labels
    noise = _normal(u.reshape(pts.shape)) * um_to_units(cfg.jitter_um)  # [3, P]
    return jnp.where(mask[None, :], pts + noise, pts), mask, labels


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
    if max(1, (num_points - 1).bit_length()) > 24:
        return jax.random.permutation(key, num_points)
    return _order_from_sorted(jnp.sort(_shuffle_keys(jax.random.bits(key, (num_points,)))))


def _shuffle_keys(bits: Array) -> Array:
    """[P] int32 sort keys: random high bits, the slot index in the low ⌈log2 P⌉ bits (P ≤ 2²⁴).

    Sorting them gives a uniformly random order (ties of the 32 − ⌈log2 P⌉ random bits keep slot
    order, probability ~P²/2³³, negligible); ``_order_from_sorted`` reads the slots back.
    """
    p = bits.shape[-1]
    nb = max(1, (p - 1).bit_length())
    packed = (bits.astype(jnp.uint32) >> nb << nb) | jnp.arange(p, dtype=jnp.uint32)  # [P]
    return jax.lax.bitcast_convert_type(packed, jnp.int32)


def _order_from_sorted(keys: Array) -> Array:
    """[P] int32 permutation from sorted ``_shuffle_keys``."""
    nb = max(1, (keys.shape[-1] - 1).bit_length())
    return keys & jnp.int32((1 << nb) - 1)


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


def _recenter_shuffle(
    bits: Array, pts: Array, mask: Array, labels: Array, cfg: SimConfig
) -> tuple[Cloud, Array | None]:
    """``recenter`` then ``shuffle`` on pts [3, P], returning xyz [P, 3] (the slots permuted and
    the points transposed back by one gather).

    Needs labels consistent with mask (``mask == (labels != PADDING)``, as ``pairs._synthesize``
    keeps them). bits: [P] uint32 random bits (unused when ``cfg.shuffle`` is False). Returns the
    cloud (xyz [P, 3], mask, labels) and the [P] slot order (None without shuffling).
    """
    pts = pts - _median_rows(pts, mask)[:, None]
    if not cfg.shuffle:
        return (pts.T, mask, labels), None
    if max(1, (pts.shape[1] - 1).bit_length()) <= 24:
        order = _order_from_sorted(jnp.sort(_shuffle_keys(bits)))
    else:  # more than 2²⁴ slots: no room for the index bits
        order = jax.random.permutation(jax.random.key(bits[0]), pts.shape[1])
    # [P, 4] points and labels (as float bits), permuted and transposed by one gather.
    rows = jnp.concatenate([pts, jax.lax.bitcast_convert_type(labels, jnp.float32)[None]], axis=0)
    slots = rows.T[order]
    labels = jax.lax.bitcast_convert_type(slots[:, 3], jnp.int32)
    return (slots[:, :3], labels != PADDING, labels), order
