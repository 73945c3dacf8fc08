"""Inference speed: ``fdnc_jax.predict`` vs the original architecture in PyTorch (same CPU, sizes).

Both sides run the same trained network: the bundled paper-size ``"default"`` weights (6 layers,
d 128, 8 heads, ff 2048, canonical pose) loaded into the PyTorch original architecture too
(``torch_reference.from_fdnc``; the two agree to ~1e-4 in log-probability, printed), one
orientation (``orientation="fixed"``: the canonical pose, computed in torch for the torch side)
and one direction (``two_way=False``: the original's forward scores, one forward per volume),
and the same number of CPU threads (``torch.set_num_threads(n)``; XLA's CPU client sizes its
intra-op pool to the cores this process may use, printed below). Trained weights matter for the
Hungarian step: a random network's near-uniform scores make it ~15x slower than real ones.

1. Single pair, end to end: two worm files (the bundled demo pair saved as .npz, 194 neurons each)
   are loaded from disk, normalised, matched by the network, and assigned one-to-one by scipy's
   Hungarian. JAX: exactly ``fdnc_jax.load_worm`` ×2 + ``fdnc_jax.predict(model, t, s,
   orientation="fixed", two_way=False)``. Torch: the same loading and normalisation
   (``fdnc_jax.worm.to_model_units``), canonical pose and the forward in
   ``torch.inference_mode()`` on the unpadded clouds, then the same host matching
   (``fdnc_jax.matching.match``: Hungarian, softmax, top-5). Position only (no color term) on both
   sides. The two are timed in alternating blocks, so background load hits both alike; the median
   of ``ROUNDS`` runs each after warm-up is reported (and the minimum).
2. Batched throughput (volumes/s) with 150-point volumes at batch 1, 16, 64, 256 (GPU: up to 4,096):
   semi-synthetic copies of one animal (``tracking_volumes``), so the scores are as peaked as in
   tracking. ``predict_batch`` (forward + matching of every volume; ``match_on="auto"``: on the host,
   on the device on a GPU from ``DEVICE_MATCH_MIN_ROWS`` volumes, where the host-matching figure is
   printed too), the raw jitted forward alone (float32 and bfloat16 products), and the torch forward
   alone. On a GPU also ``predict_batch`` of 4,096 volumes by chunk size and device matching solver
   (``accelerator_sweep``; the matching alone: ``matching_bench.py``).

Notes from profiling on this project's 2-core AVX-512/AMX Xeon:
- The paper-size forward of ~400 tokens is ~3 GFLOP; float32 on both sides. The attention's masked
  softmax over [8, L, L] per layer is memory-bound (each pass over 5 MB of weights costs ~0.3 ms):
  JAX computes it head by head on CPU (``fdnc_jax.model.layers.head_by_head_attention``, -20 %);
  the 2048-wide feed-forward is compute-bound. JAX pads 194 neurons to the 208 bucket (+7 %
  tokens) where torch runs the exact size.
- ``Model.with_matmul_dtype("bfloat16")`` (AMX bfloat16 products, float32 accumulation) is timed
  as an extra row; the contract line is the float32 default.
- One jitted call of 16+ paper-size volumes is slower per volume than batch 1 on CPU (tens of
  MB of activations page-faulted on every call); ``predict_batch`` therefore runs small chunks on
  CPU (``fdnc_jax.predict.CPU_CHUNK_BYTES``).

Run (needs the ``bench`` extra, ``pip install -e .[bench]``):
  python benchmarks/predict_bench.py
  python benchmarks/predict_bench.py --accelerator_sweep_only  # GPU: section 2's sweep alone
  python benchmarks/predict_bench.py --accelerator_sweep_only --quick  # its default-solver rows
The last line is ``predict single_pair_ms=<float> torch_ms=<float> speedup=<float>``.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

# torch's OpenMP workers spin-wait by default: on a machine where another process holds a core,
# that makes a 2-thread forward ~10x slower (measured here). Passive waiting keeps torch at its
# normal speed under load; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# On a GPU, torch runs beside JAX: JAX's default preallocation of 75 % of the GPU left torch too
# little for batch 4,096 (an H100 run ran out of memory); half each.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402

try:  # the bench extra; --accelerator_sweep_only runs without it
    import torch  # noqa: E402
except ImportError:
    torch = None

import fdnc_jax as fd  # noqa: E402
from fdnc_jax import matching  # noqa: E402
from fdnc_jax.worm import to_model_units  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from timing import timed  # noqa: E402

if torch is not None:
    from torch_reference import canonical_pose, count_params, from_fdnc  # noqa: E402
from volumes import BATCH_NEURONS, tracking_volumes  # noqa: E402

predict_mod = importlib.import_module("fdnc_jax.predict")  # The module; fd.predict is a function.

ROUNDS = 30
BLOCKS = 3
WARMUP = 3
BATCHES = (1, 16, 64, 256)
GPU_BATCHES = (1, 16, 64, 256, 1024, 4096)
MIN_SECONDS = 2.0  # Per throughput cell: repeat until this much time (at least 2 runs; 1 s on GPU).


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def throughput(fn, batch: int) -> float:
    """Volumes per second of ``fn`` (one call = ``batch`` volumes; ``timing.throughput``)."""
    return timing.throughput(fn, batch, MIN_SECONDS)


# On a GPU run (JAX sees a GPU and torch has CUDA) the torch side runs on the GPU too, with TF32
# matrix products allowed as XLA's default f32 precision on GPU does.
ON_GPU = jax.default_backend() == "gpu"
TORCH_DEVICE = None if torch is None else torch.device(
    "cuda" if ON_GPU and torch.cuda.is_available() else "cpu")
if ON_GPU:
    MIN_SECONDS = 1.0
if ON_GPU and torch is not None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def torch_sync() -> None:
    """Waits for queued CUDA work (timing); nothing on CPU."""
    if TORCH_DEVICE is not None and TORCH_DEVICE.type == "cuda":
        torch.cuda.synchronize()


def torch_inputs(worms: list[fd.Worm]) -> tuple[torch.Tensor, torch.Tensor]:
    """Model units, canonical pose (unpadded, equal sizes) → ([B, P, 3], [B, P] mask)."""
    xyz = torch.from_numpy(np.stack([to_model_units(w)[0] for w in worms])).to(TORCH_DEVICE)
    return canonical_pose(xyz), torch.ones(xyz.shape[:2], dtype=torch.bool, device=TORCH_DEVICE)


SWEEP_VOLUMES = 8192  # predict_batch calls of the accelerator sweep
SWEEP_CHUNKS = (2048, 4096, 8192, 1024)  # the default first: a capped run keeps the first rows
AUTO_VOLUMES = 4096  # the orientation="auto" rows (8 forwards per volume)


def accelerator_sweep(model, template, worms, quick: bool = False) -> None:
    """GPU only: ``predict_batch`` end to end by chunk size (``BATCH_CHUNK``; the memory bound
    lifted) and device matching solver (``device_solver``), and with the default orientation
    search. The matching alone, by batch and solver: ``benchmarks/matching_bench.py``.

    ``quick`` (``--quick``, for a short GPU lease): the default solver alone, chunks of 2,048 and
    8,192, the largest also with bfloat16 matrix products (``Model.with_matmul_dtype``)."""
    n = len(worms)
    solvers = (predict_mod.DEVICE_SOLVER,) if quick else matching.DEVICE_SOLVERS
    print(f"\npredict_batch end to end, {n} volumes, by chunk size and device solver (volumes/s)",
          flush=True)
    defaults = predict_mod.BATCH_CHUNK, predict_mod._accelerator_budget

    def rate(solver: str, tests=worms, model=model, **kwargs) -> str:
        try:
            return f"  {solver} {throughput(lambda: fd.predict_batch(model, template, tests, use_color=False, device_solver=solver, **kwargs), len(tests)):>9.1f}"  # noqa: E501
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
            return f"  {solver} failed: {type(e).__name__}: {str(e)[:120]}"

    predict_mod._accelerator_budget = lambda: 64 << 30  # the chunk alone decides
    for chunk in (2048, 8192) if quick else SWEEP_CHUNKS:
        predict_mod.BATCH_CHUNK = chunk
        print(f"  chunk {chunk:>5}:" + "".join(
            rate(s, orientation="fixed", two_way=False) for s in solvers), flush=True)
    if quick:
        fast = model.with_matmul_dtype("bfloat16")
        print(f"  chunk {chunk:>5}, bfloat16 products:" + "".join(
            rate(s, model=fast, orientation="fixed", two_way=False) for s in solvers), flush=True)
    predict_mod.BATCH_CHUNK, predict_mod._accelerator_budget = defaults
    auto = worms[:AUTO_VOLUMES]
    print(f"  default chunk, orientation='auto' (4 flips, both directions, chosen on the device; "
          f"two-way scores), "
          f"{len(auto)} volumes:" + "".join(rate(s, auto) for s in solvers),
          flush=True)


def sweep_only() -> None:
    """``--accelerator_sweep_only``: the GPU sweep alone (no torch side, no single pair)."""
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}")
    template, worms = tracking_volumes(SWEEP_VOLUMES)
    accelerator_sweep(fd.load_pretrained("default"), template, worms, "--quick" in sys.argv[1:])


def main() -> None:
    n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch is None:
        raise SystemExit("predict_bench needs PyTorch for its baseline: pip install -e .[bench]")
    torch.set_num_threads(n_threads)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), CPU: {cpu_name()}")
    print(f"threads: torch.get_num_threads()={torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), XLA CPU pool = {n_threads} usable "
          f"cores; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"jax {jax.__version__}, torch {torch.__version__}, load average {os.getloadavg()}")

    model = fd.load_pretrained("default")
    net = from_fdnc(model).to(TORCH_DEVICE)
    print(f"torch device: {TORCH_DEVICE}; model {model.config}")
    total, _ = count_params(net)
    print(f"params: ours {model.num_params:,}; torch {total:,} in its forward (the original also "
          "registered an unused prototype layer: the paper's 4.15 M)")

    # ------------------------------------------------------------------ 1. single pair, end to end
    template, test = fd.load_demo_pair()
    with tempfile.TemporaryDirectory() as tmp:
        t_path, s_path = Path(tmp) / "template.npz", Path(tmp) / "test.npz"
        fd.save_worm(template, t_path)
        fd.save_worm(test, s_path)

        def jax_pair():
            t, s = fd.load_worm(t_path), fd.load_worm(s_path)
            return fd.predict(model, t, s, use_color=False, orientation="fixed", two_way=False)

        model_bf16 = model.with_matmul_dtype("bfloat16")

        def jax_pair_bf16():
            t, s = fd.load_worm(t_path), fd.load_worm(s_path)
            return fd.predict(model_bf16, t, s, use_color=False, orientation="fixed", two_way=False)

        def torch_pair():
            t, s = fd.load_worm(t_path), fd.load_worm(s_path)
            t_xyz, t_mask = torch_inputs([t])
            s_xyz, s_mask = torch_inputs([s])
            with torch.inference_mode():
                lp = net(t_xyz, t_mask, s_xyz, s_mask)[0].cpu().numpy()
            return matching.match(lp, top_k=5)

        for _ in range(WARMUP):
            jax_pair()
            jax_pair_bf16()
            torch_pair()
        jax_ms, bf16_ms, torch_ms = [], [], []
        for _ in range(BLOCKS):  # Alternating blocks: drifting background load hits all alike.
            for fn, out in ((jax_pair, jax_ms), (jax_pair_bf16, bf16_ms), (torch_pair, torch_ms)):
                fn()  # The other runtime's threads were busy last; let this one's pool wake.
                out.extend(timed(fn) * 1e3 for _ in range(ROUNDS // BLOCKS))

        # Where the JAX time goes (same pair, medians of ROUNDS); agreement with torch.
        t, s = fd.load_worm(t_path), fd.load_worm(s_path)
        signs = predict_mod.orientation_hypotheses(model, "fixed")  # [1, 3]: the canonical pose
        lp = predict_mod._log_probs(model, t, [s], signs)[0][0]
        t_xyz, t_mask = torch_inputs([t])
        s_xyz, s_mask = torch_inputs([s])
        with torch.inference_mode():
            lp_torch = net(t_xyz, t_mask, s_xyz, s_mask)[0].cpu().numpy()
        agreement = (np.abs(lp - lp_torch).max(),
                     np.mean(matching.match(lp).assignment == matching.match(lp_torch).assignment))
        parts = {
            "load_worm x2": lambda: (fd.load_worm(t_path), fd.load_worm(s_path)),
            "pad + forward + fetch": lambda: predict_mod._log_probs(model, t, [s], signs),
            "host matching": lambda: matching.match(lp, top_k=5),
        }
        breakdown = {k: statistics.median(timed(f) * 1e3 for _ in range(ROUNDS // 2))
                     for k, f in parts.items()}
        # What a user gets by default: the 4-way orientation search (4 forwards in one call, 4 more
        # the other way round for the cycle-consistency criterion).
        auto = lambda: fd.predict(model, fd.load_worm(t_path), fd.load_worm(s_path))
        for _ in range(WARMUP):
            auto()
        auto_ms = statistics.median(timed(auto) * 1e3 for _ in range(ROUNDS))

    jax_med, torch_med = statistics.median(jax_ms), statistics.median(torch_ms)
    bf16_med = statistics.median(bf16_ms)
    print(f"\nsingle pair end to end ({template.n} + {test.n} neurons, buckets "
          f"{predict_mod.bucket_size(template.n)}/{predict_mod.bucket_size(test.n)} for JAX; "
          f"median of {ROUNDS}, alternating blocks)")
    print("  jax breakdown: " + ", ".join(f"{k} {v:.1f} ms" for k, v in breakdown.items()))
    print(f"  jax vs torch log-probs: max |difference| {agreement[0]:.1e}, same assignment for "
          f"{agreement[1]:.1%} of test neurons")
    print(f"  fd.predict with the default 4-way orientation search: {auto_ms:.1f} ms end to end")

    # ------------------------------------------------------------------ 2. batched throughput
    batches = GPU_BATCHES if ON_GPU else BATCHES
    b_template, worms = tracking_volumes(max(batches))
    forward = predict_mod._compiled_forward(model)
    forward_bf16 = predict_mod._compiled_forward(model_bf16)
    size = predict_mod.bucket_size(BATCH_NEURONS)
    t_xyz, t_mask, _ = predict_mod._model_inputs(b_template, size, False)
    chunk = predict_mod._max_chunk(model, size, size)
    print(f"\nthroughput, volumes/s ({BATCH_NEURONS}-point semi-synthetic copies of one animal, "
          f"JAX padded to bucket {size}; predict_batch runs chunks of ≤ {chunk} volumes here, "
          "'jax forward' and 'torch forward' one call of the whole batch)")
    print(f"{'batch':>6} {'predict_batch':>14} {'jax forward':>12} {'bf16 forward':>13} "
          f"{'torch forward':>14} {'fwd ratio':>10} {'e2e ratio':>10}", flush=True)
    for b in batches:
        tests = worms[:b]
        inputs = [predict_mod._model_inputs(w, size, False) for w in tests]
        s_xyz, s_mask = (np.stack([x[j] for x in inputs]) for j in (0, 1))
        tt_xyz, tt_mask = torch_inputs([b_template] * b)
        ts_xyz, ts_mask = torch_inputs(tests)

        def torch_forward(tt_xyz=tt_xyz, tt_mask=tt_mask, ts_xyz=ts_xyz, ts_mask=ts_mask):
            with torch.inference_mode():
                net(tt_xyz, tt_mask, ts_xyz, ts_mask)
            torch_sync()

        pb = throughput(lambda tests=tests: fd.predict_batch(
            model, b_template, tests, use_color=False, orientation="fixed", two_way=False), b)
        s_signs = np.ones((b, 3), np.float32)  # The one (identity) orientation hypothesis.
        raw = throughput(lambda s_xyz=s_xyz, s_mask=s_mask, s_signs=s_signs: forward(
            model.params, t_xyz, t_mask, s_xyz, s_mask, None, None, s_signs).block_until_ready(), b)
        raw_bf16 = throughput(lambda s_xyz=s_xyz, s_mask=s_mask, s_signs=s_signs: forward_bf16(
            model.params, t_xyz, t_mask, s_xyz, s_mask, None, None, s_signs).block_until_ready(), b)
        tf = throughput(torch_forward, b)
        note = ""
        if ON_GPU and b <= 1024:  # predict_batch matches on the device there; time the host too.
            note = "   (match_on='host': {:.1f})".format(throughput(lambda tests=tests: fd.predict_batch(
                model, b_template, tests, use_color=False, orientation="fixed", two_way=False,
                match_on="host"), b))
        print(f"{b:>6} {pb:>14.1f} {raw:>12.1f} {raw_bf16:>13.1f} {tf:>14.1f} {raw / tf:>9.2f}x "
              f"{pb / tf:>9.2f}x" + note, flush=True)
    if ON_GPU:
        accelerator_sweep(model, b_template, worms)
    print(f"\n{'single pair (ms)':<26} {'jax':>8} {'torch':>8} {'speedup':>8}")
    print(f"{'end to end, median':<26} {jax_med:>8.2f} {torch_med:>8.2f} "
          f"{torch_med / jax_med:>7.2f}x")
    print(f"{'end to end, min':<26} {min(jax_ms):>8.2f} {min(torch_ms):>8.2f} "
          f"{min(torch_ms) / min(jax_ms):>7.2f}x")
    print(f"{'bfloat16 matmuls, median':<26} {bf16_med:>8.2f} {torch_med:>8.2f} "
          f"{torch_med / bf16_med:>7.2f}x  (Model.with_matmul_dtype('bfloat16'); torch float32)")
    print(f"load average at the end {os.getloadavg()}")
    print(f"predict single_pair_ms={jax_med:.3f} torch_ms={torch_med:.3f} "
          f"speedup={torch_med / jax_med:.3f}")


if __name__ == "__main__":
    sweep_only() if "--accelerator_sweep_only" in sys.argv[1:] else main()
