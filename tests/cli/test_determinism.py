"""Determinism of ``aad-compare`` on CPU: the same seed and config give the same
``distances.json`` (and embeddings) from two separate runs of the console script with the
embedding cache off; another seed changes the permutation p-values and bootstrap intervals but
not the distances themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aad_med.data.synthetic import generate_cohort
from tests.cli.conftest import run_cli

SHAPE = (24, 28, 20)
# Only the time of writing and the command line (it names the run folder) differ legitimately
# between two runs of one comparison: every path recorded (checkpoint, cohorts) is the same input.
VARYING = ("created", "timings")  # timings: seconds per phase, differ per run

pytestmark = pytest.mark.slow  # three aad-compare runs, each importing torch and MONAI


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("determinism")
    # Two samples of one population: p-values away from their floor 1/(B+1), so a change of
    # seed shows in them.
    a = generate_cohort(root / "a", 6, "reference", seed=1, shape=SHAPE, id_prefix="A_")
    b = generate_cohort(root / "b", 6, "reference", seed=2, shape=SHAPE, id_prefix="B_")
    outs = {}
    for name, seed in (("first", 0), ("second", 0), ("other_seed", 1)):
        out = root / name
        proc = run_cli(
            "compare",
            [
                f"checkpoint={tiny_checkpoint}",
                f"cohorts.a={a}",
                f"cohorts.b={b}",
                f"seed={seed}",
                "stats.n_permutations=199",
                "stats.n_bootstrap=100",
                "stats.bands_bootstrap=50",
                "embedding.cache=false",
                "device=cpu",
                f"hydra.run.dir={out}",
            ],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = out
    return outs


def _distances(out: Path) -> dict:
    doc = json.loads((out / "distances.json").read_text())
    for key in VARYING:
        assert key in doc
        doc.pop(key)
    command = doc["provenance"].pop("command")
    assert (
        command.startswith("python -m aad_med.cli.compare ") and f"hydra.run.dir={out}" in command
    )
    return doc


def test_same_seed_same_distances_json(runs):
    first, second = _distances(runs["first"]), _distances(runs["second"])
    assert first["settings"]["seed"] == 0 and first["settings"]["device"] == "cpu"
    # Exact equality of every number, every statistic (all tests ran), and every list.
    assert first == second
    pair = first["pairs"][0]
    assert pair["aad"] > 0 and 1 / 200 < pair["aad_p"] < 1
    assert pair["mmd_p"] is not None and pair["energy_p"] is not None


def test_same_seed_same_embeddings_and_tables(runs):
    for name in ("embeddings.csv", "pairwise_aad.csv"):
        assert (runs["first"] / name).read_bytes() == (runs["second"] / name).read_bytes(), name


def test_other_seed_changes_p_values_and_intervals_only(runs):
    first, other = _distances(runs["first"]), _distances(runs["other_seed"])
    assert other["settings"]["seed"] == 1
    p, q = first["pairs"][0], other["pairs"][0]
    # The encoder and the subjects are the same: so are the distances.
    # aad_ci95 is analytic (no resampling), so it is a distance-like number here too.
    for key in ("aad", "aad2_unbiased", "aad_ci95", "mmd2", "energy", "frechet"):
        assert p[key] == q[key], key
    # So are the seed's latent AAD and the intensity fingerprint distance, always computed.
    for key in ("latent_aad", "intensity_distance"):
        assert p[key] == q[key] and p[key] > 0, key
    assert first["intensity"] == other["intensity"]
    assert first["pairwise_aad"] == other["pairwise_aad"]
    # The shuffles and resamples are not.
    assert p["aad_p"] != q["aad_p"]
    assert p["aad_null_median"] != q["aad_null_median"]
