"""Batched one-to-one matching on the device: the parallel auction vs optax's Hungarian.

``predict_batch`` on an accelerator matches every volume on the device
(``matching.match_batch_device``); with ``solver="hungarian"`` (``optax.assignment.hungarian_algorithm``
under ``vmap``) the rows of a volume are augmented one after another, and on an H100 that step capped
``predict_batch`` at ~3,200 volumes/s while the forward ran at ~18,600. ``solver="auction"``
(``fdnc_jax.auction``) lets all volumes bid at once. This script times both, side by side in one run,
on the bundled ``default`` model's log-probabilities for tracking volumes (150-point semi-synthetic
copies of one animal, padded to the 160 bucket: the scores are as peaked as in tracking), tiled to
each batch size, through the whole ``match_batch_device`` (assignment, softmax, top-5). It also
prints the auction's rounds per volume, how many volumes get the Hungarian's very assignment, and the
largest loss of total score (the auction's guarantee: ≤ ``auction.DEFAULT_TOLERANCE``), and, on CPU,
the host path (scipy per volume in ``predict``'s thread pool) as the default there. A second table
times the auction's assignment alone with its unfinished problems compacted into smaller batches
(``auction.COMPACT_FACTOR``, the default) against the whole batch in lock-step (the same results).

Run: ``python benchmarks/matching_bench.py`` (CPU: batches 64 and 256; GPU: 256 to 16,384).
The last line is ``matching batch=<int> auction_vol_s=<float> hungarian_vol_s=<float>
speedup=<float>`` for the largest batch.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fdnc_jax as fd
from fdnc_jax import auction, matching

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from volumes import BATCH_NEURONS, tracking_volumes  # noqa: E402

predict_mod = importlib.import_module("fdnc_jax.predict")

ON_CPU = jax.default_backend() == "cpu"
DISTINCT = 128 if ON_CPU else 1024  # distinct volumes, tiled to the batch size
BATCHES = (64, 256) if ON_CPU else (256, 1024, 4096, 16384)
MIN_SECONDS = 2.0


def throughput(fn, batch: int) -> float:
    """Volumes per second of ``fn`` (one call = ``batch`` volumes; ``timing.throughput``)."""
    return timing.throughput(fn, batch, MIN_SECONDS)


def _total(scores: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """[B] summed score of the assigned cells of [B, M, N] scores ([B, M] assignment, −1 = none)."""
    picked = np.take_along_axis(scores, np.maximum(assignment, 0)[..., None], 2)[..., 0]
    return np.where(assignment >= 0, picked, 0.0).astype(np.float64).sum(1)


def compaction_table(scores: np.ndarray, s_mask: np.ndarray, device) -> None:
    """Volumes/s of ``auction.auction_batch`` alone per batch size: unfinished problems compacted
    (the default) vs the whole batch in lock-step (``COMPACT_MIN`` beyond the batch)."""
    print(f"\nauction assignment alone, volumes/s, {device.device_kind}")
    print(f"{'batch':>6} {'compacted':>10} {'lock-step':>10} {'ratio':>7} {'same':>5}", flush=True)
    default_min = auction.COMPACT_MIN
    for b in BATCHES:
        reps = -(-b // len(scores))
        s_b = jnp.asarray(np.tile(scores, (reps, 1, 1))[:b])
        v_b = jnp.asarray(np.tile(s_mask, (reps, 1))[:b])
        rate, out = {}, {}
        for name, compact_min in (("compacted", default_min), ("lock-step", b + 1)):
            auction.COMPACT_MIN = compact_min  # read when traced: a fresh jit per setting
            fn = jax.jit(lambda s, v: auction.auction_batch(s, v)[0])
            out[name] = np.asarray(fn(s_b, v_b))
            rate[name] = throughput(
                lambda fn=fn, s_b=s_b, v_b=v_b: jax.block_until_ready(fn(s_b, v_b)), b
            )
        auction.COMPACT_MIN = default_min
        same = bool((out["compacted"] == out["lock-step"]).all())
        print(f"{b:>6} {rate['compacted']:>10.1f} {rate['lock-step']:>10.1f} "
              f"{rate['compacted'] / rate['lock-step']:>6.2f}x {str(same):>5}", flush=True)


def main() -> None:
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
          f"cores {len(os.sched_getaffinity(0))}; load average {os.getloadavg()}")
    model = fd.load_pretrained("default")
    template, worms = tracking_volumes(DISTINCT)
    signs = np.ones((1, 3), np.float32)
    found = predict_mod._hypothesis_log_probs(model, template, worms, signs)
    size = predict_mod.bucket_size(BATCH_NEURONS)
    lp = np.full((DISTINCT, size, size + 1), -np.inf, np.float32)  # [V, M, N + 1] padded
    for i in range(DISTINCT):
        x = found[i, 0]  # [150, 151]
        lp[i, :BATCH_NEURONS, :BATCH_NEURONS] = x[:, :-1]
        lp[i, :BATCH_NEURONS, -1] = x[:, -1]
    lp[:, BATCH_NEURONS:, :] = 0.0  # padded rows (masked)
    t_mask = np.zeros((size,), bool)
    t_mask[:BATCH_NEURONS] = True
    s_mask = np.zeros((DISTINCT, size), bool)
    s_mask[:, :BATCH_NEURONS] = True

    # Agreement and rounds on the distinct volumes.
    scores = np.where(t_mask[None, None] & s_mask[..., None], lp[..., :-1], -np.inf)
    t_masks = np.broadcast_to(t_mask, (DISTINCT, size))
    out = {s: matching.match_batch_device(lp, t_masks, s_mask, top_k=5, solver=s)
           for s in matching.DEVICE_SOLVERS}
    a_h, a_a = (np.asarray(out[s]["assignment"]) for s in ("hungarian", "auction"))
    gap = _total(scores, a_h) - _total(scores, a_a)
    rounds = np.asarray(jax.jit(auction.auction_batch)(scores, s_mask)[2])
    print(f"\n{DISTINCT} distinct volumes of {BATCH_NEURONS} neurons (bucket {size}): auction = "
          f"Hungarian assignment for {np.mean((a_h == a_a).all(1)):.1%} of volumes "
          f"({np.mean(a_h == a_a):.2%} of neurons); total score lost ≤ {gap.max():.2e} "
          f"(tolerance {auction.DEFAULT_TOLERANCE}); auction rounds per volume: median "
          f"{np.median(rounds):.0f}, max {rounds.max()} (S={auction.BIDDERS} bidders per round)")

    compaction_table(scores, s_mask, device)

    print(f"\nmatch_batch_device (assignment + softmax + top-5), volumes/s, {device.device_kind}")
    header = f"{'batch':>6} {'auction':>10} {'hungarian':>10} {'ratio':>7}"
    print(header + (f" {'host (scipy)':>13}" if ON_CPU else ""), flush=True)
    last = None
    for b in BATCHES:
        reps = -(-b // DISTINCT)
        lp_b = jnp.asarray(np.tile(lp, (reps, 1, 1))[:b])
        s_b = jnp.asarray(np.tile(s_mask, (reps, 1))[:b])
        t_b = jnp.broadcast_to(jnp.asarray(t_mask), (b, size))
        rate = {}
        for solver in matching.DEVICE_SOLVERS:
            try:
                run = lambda s=solver, lp_b=lp_b, t_b=t_b, s_b=s_b: jax.block_until_ready(  # noqa: E731
                    matching.match_batch_device(lp_b, t_b, s_b, top_k=5, solver=s))
                rate[solver] = throughput(run, b)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
                print(f"{b:>6} {solver} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rate[solver] = float("nan")
        line = (f"{b:>6} {rate['auction']:>10.1f} {rate['hungarian']:>10.1f} "
                f"{rate['auction'] / rate['hungarian']:>6.2f}x")
        if ON_CPU:
            host_lp = [found[i % DISTINCT, 0] for i in range(b)]
            line += " {:>13.1f}".format(throughput(
                lambda h=host_lp: predict_mod._host_map(lambda x: matching.match(x, top_k=5), h), b))
        print(line, flush=True)
        last = (b, rate["auction"], rate["hungarian"])
    b, ra, rh = last
    print(f"matching batch={b} auction_vol_s={ra:.1f} hungarian_vol_s={rh:.1f} "
          f"speedup={ra / rh:.3f}")


if __name__ == "__main__":
    main()
