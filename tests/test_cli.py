"""The fdnc-predict command line, run as a user would (a subprocess)."""

from __future__ import annotations

import importlib.resources
import subprocess

import pytest
from cli_process import run_cli

WEIGHTS = importlib.resources.files("fdnc_jax") / "data" / "fdnc_position.npz"


def run_predict(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("predict", *args, timeout=timeout)


def test_help_lists_flags():
    out = run_predict("--help")
    assert out.returncode in (0, 1), out.stderr  # absl's --help exits with 1 after printing usage.
    assert "Traceback" not in out.stderr
    for flag in (
        "--template",
        "--test",
        "--use_color",
        "--top_k",
        "--min_probability",
        "--out",
        "--checkpoint",
        "--demo",
        "--matmul_dtype",
        "--recording",
        "--reference_volume",
        "--[no]two_way",
    ):
        assert flag in out.stdout, f"{flag} missing from --help"


def test_matmul_dtype_choices_match_the_model():
    from fdnc_jax.cli._common import MATMUL_DTYPE_CHOICES
    from fdnc_jax.model.fdnc import MATMUL_DTYPES

    assert tuple(MATMUL_DTYPE_CHOICES) == MATMUL_DTYPES


def test_missing_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.npz"
    out = run_predict(f"--template={missing}", f"--test={missing}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("fdnc-predict: error:")
    assert "nope.npz: no such file" in lines[0]  # files are read before the model is loaded


def test_demo_runs():
    if not WEIGHTS.is_file():
        pytest.skip("bundled weights fdnc_jax/data/fdnc_position.npz not present yet")
    out = run_predict("--demo")  # Both demo worms have color: --weights=auto picks "color".
    assert out.returncode == 0, out.stderr
    assert "model: bundled weights 'color'" in out.stdout
    assert "accuracy" in out.stdout
    correct = int(out.stdout.split("accuracy ")[1].split("/")[0])
    fast = run_predict("--demo", "--matmul_dtype=bfloat16")
    assert fast.returncode == 0, fast.stderr
    # bfloat16 products move single names (on 90 real pairs: mean |change| 0.6 points, max 5).
    assert abs(int(fast.stdout.split("accuracy ")[1].split("/")[0]) - correct) <= 15
    one_way = run_predict("--demo", "--notwo_way")  # the original's forward scores
    assert one_way.returncode == 0, one_way.stderr
    assert abs(int(one_way.stdout.split("accuracy ")[1].split("/")[0]) - correct) <= 15
    out = run_predict("--demo", "--weights=nope")
    assert out.returncode == 2 and "no bundled weights named 'nope'" in out.stderr


def _recording(path, worm, count: int = 3) -> list[int]:
    """A recording of ``count`` volumes of ``worm`` (numbered 10, 11, ...): neurons dropped, moved
    by ~0.5 µm, as consecutive volumes of one animal. Returns the neurons per volume."""
    import numpy as np

    import fdnc_jax as fd

    rng = np.random.default_rng(0)
    volumes = []
    for k in range(count):
        w = worm.subset(np.sort(rng.permutation(worm.n)[: worm.n - 4 * k]))
        volumes.append(w.replace(xyz_um=w.xyz_um + rng.normal(0, 0.5, (w.n, 3))))
    fd.save_recording(volumes, path, numbers=list(range(10, 10 + count)))
    return [v.n for v in volumes]


def test_recording_tracked_to_one_of_its_volumes(tmp_path):
    """--recording with --reference_volume: every volume matched to that volume; one CSV with a
    volume column; the names carried over are right for nearly every neuron (same animal)."""
    import csv

    import fdnc_jax as fd

    _, test = fd.load_demo_pair()
    sizes = _recording(tmp_path / "rec.npz", test)
    out = run_predict(
        f"--recording={tmp_path / 'rec.npz'}",
        "--reference_volume=11",
        "--weights=small",
        f"--out={tmp_path / 'tracks.csv'}",
        "--progress=true",
    )
    assert out.returncode == 0, out.stderr
    assert "3 volumes (numbers 10..12)" in out.stdout and "reference: volume 11" in out.stdout
    assert "predict: 100%" in out.stderr and "3/3" in out.stderr  # the progress bar
    line = next(x for x in out.stdout.splitlines() if x.startswith("accuracy"))
    correct, counted = map(int, line.split()[1].split("/"))
    others = sizes[0] + sizes[2]  # the reference volume is not scored against itself
    assert 0.9 * others < counted <= others and correct / counted > 0.9, line
    with open(tmp_path / "tracks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(sizes)
    assert [int(r["volume"]) for r in rows] == [10] * sizes[0] + [11] * sizes[1] + [12] * sizes[2]


def test_recording_flag_errors(tmp_path):
    import fdnc_jax as fd

    _, test = fd.load_demo_pair()
    _recording(tmp_path / "rec.csv", test, count=2)
    out = run_predict(f"--recording={tmp_path / 'rec.csv'}", "--reference_volume=3")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--reference_volume=3: " in out.stderr and "volumes 10..11, 2 in all" in out.stderr
    out = run_predict(f"--test={tmp_path / 'rec.csv'}")  # a recording given as one worm
    assert out.returncode == 2 and "fdnc_jax.load_recording" in out.stderr
    out = run_predict("--reference_volume=3", f"--test={tmp_path / 'rec.csv'}")
    assert out.returncode != 0 and "give --recording" in out.stderr
    out = run_predict("--demo", f"--recording={tmp_path / 'rec.csv'}")
    assert out.returncode != 0 and "--demo uses the bundled demo pair" in out.stderr
    rec = f"--recording={tmp_path / 'rec.csv'}"
    out = run_predict(rec, "--reference_volume=10", "--reflect_template")
    assert out.returncode == 2 and "drop --reflect_template" in out.stderr


def test_recording_side_flags_reach_the_reference_volume(tmp_path):
    """--reflect_test mirrors every volume, the reference included: tracking is unchanged (all
    volumes stay in one frame)."""
    import fdnc_jax as fd

    _, test = fd.load_demo_pair()
    _recording(tmp_path / "rec.npz", test)
    for flag in ([], ["--reflect_test"]):
        out = run_predict(
            f"--recording={tmp_path / 'rec.npz'}", "--reference_volume=10", "--weights=small", *flag
        )
        assert out.returncode == 0, out.stderr
        line = next(x for x in out.stdout.splitlines() if x.startswith("accuracy"))
        correct, counted = map(int, line.split()[1].split("/"))
        # A reference left unreflected (the other volumes' mirror image): ~97 %, mean
        # probability ~0.68 instead of ~0.9.
        assert correct / counted > 0.99, (flag, line)
        mean = float(next(x for x in out.stdout.splitlines() if "volumes matched" in x).split()[-1])
        assert mean > 0.85, (flag, mean)


def test_test_flag_takes_a_folder_or_a_glob(tmp_path):
    """--test=<folder> and --test='<glob>' stand for their files, in sorted order: one accuracy line
    and one --out file per test worm."""
    import fdnc_jax as fd

    template, test = fd.load_demo_pair()
    folder = tmp_path / "volumes"
    for k in (2, 1):
        fd.save_worm(test.subset(range(test.n - 10 * k)), folder / f"vol{k}.csv")
    fd.save_worm(template, tmp_path / "template.npz")
    for spec in (str(folder), str(folder / "vol*.csv")):
        out = run_predict(
            f"--template={tmp_path / 'template.npz'}",
            f"--test={spec}",
            "--weights=small",
            f"--out={tmp_path / 'pred.csv'}",
        )
        assert out.returncode == 0, out.stderr
        lines = [x for x in out.stdout.splitlines() if ": accuracy " in x]
        assert [x.split(":")[0] for x in lines] == ["vol1.csv", "vol2.csv"], out.stdout
        assert (tmp_path / "pred_vol1.csv").is_file() and (tmp_path / "pred_vol2.csv").is_file()
    out = run_predict(f"--test={tmp_path / 'nothing*.csv'}")
    assert out.returncode == 2 and "no worm files match" in out.stderr
    # A file named with glob characters is taken as named, not as a pattern ("vol[1].csv" would
    # match "vol1.csv").
    fd.save_worm(test.subset(range(50)), folder / "vol[1].csv")
    out = run_predict(
        f"--template={tmp_path / 'template.npz'}",
        f"--test={folder / 'vol[1].csv'}",
        "--weights=small",
    )
    assert out.returncode == 0, out.stderr
    assert "vol[1].csv: accuracy" in out.stdout and "/50 " in out.stdout


def test_several_templates_vote(tmp_path):
    """--template with several files (here a glob and the atlas): the templates vote, as
    fd.predict with a list of templates, and the accuracy counts the names any of them carries."""
    import numpy as np

    import fdnc_jax as fd
    from fdnc_jax.datasets import load_bundled_worm
    from fdnc_jax.metrics import name_accuracy

    _, test = fd.load_demo_pair()
    voters = [load_bundled_worm(n) for n in ("NP_11_YAaLR", "EY_20190924_03")]
    for i, v in enumerate(voters):
        fd.save_worm(v, tmp_path / f"voter{i}.npz")
    fd.save_worm(test, tmp_path / "test.npz")
    out = run_predict(
        f"--template={tmp_path / 'voter*.npz'},atlas",
        f"--test={tmp_path / 'test.npz'}",
        "--weights=small",
        "--use_color=false",
    )
    assert out.returncode == 0, out.stderr
    assert "3 templates vote on every name" in out.stdout
    line = next(x for x in out.stdout.splitlines() if ": accuracy " in x)
    pred = fd.predict(
        fd.load_pretrained("small"), [*voters, fd.load_atlas()], test, use_color=False
    )
    names = set(np.asarray(pred.template_names).tolist())
    correct, counted = name_accuracy(names, test, pred.labels)
    assert f"accuracy {correct}/{counted} " in line, line
    out = run_predict(
        f"--template={tmp_path / 'voter0.npz'},{tmp_path / 'test.npz'}",
        f"--test={tmp_path / 'test.npz'}",
        "--weights=small",
    )
    assert out.returncode == 0, out.stderr  # a plain comma-separated list of files
    assert "2 templates vote on every name" in out.stdout
