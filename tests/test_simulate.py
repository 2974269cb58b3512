"""`jackpot simulate`: a fast smoke run of the CLI (json shape, invariants, PNGs) and the issue's
acceptance condition at the default protocol (lognormal family, KL before ~0.009, V = 32000)."""

from __future__ import annotations

import json
import math

import pytest

from jackpot import simulate
from jackpot.cli import main

POINT_KEYS = {"sigma", "kl_before", "kl_after", "acceptance"}


def _run(out, *extra: str) -> dict:
    assert main(["simulate", "--out", str(out), *extra]) == 0
    return json.loads((out / "simulation.json").read_text())


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return [obj] if isinstance(obj, float) else []


def test_cli_smoke(tmp_path):
    out = tmp_path / "sim"
    res = _run(out, "--vocab", "2000", "--states", "4", "--n-sigma", "5", "--n-budgets", "5", "--seed", "3")
    assert res["vocab"] == 2000 and res["lambda"] == 1.0
    assert set(res["families"]) == {"lognormal", "gaussian"}
    for points in res["families"].values():
        assert len(points) == 5 + 2  # the grid plus the two anchors (KL 0.001 and 0.009)
        sigmas = [p["sigma"] for p in points]
        assert sigmas == sorted(sigmas)
        for p in points:
            assert set(p) == POINT_KEYS
            assert all(math.isfinite(v) for v in p.values())
            assert p["kl_after"] <= p["kl_before"]
            assert 0.0 < p["acceptance"] <= 1.0
        kl = [p["kl_before"] for p in points]
        assert kl[0] == pytest.approx(1e-4, rel=1e-2) and kl[-1] == pytest.approx(1.0, rel=1e-2)
    assert all(math.isfinite(x) for x in _finite_numbers(res))
    assert (out / "simulation.png").stat().st_size > 0
    assert (out / "budget_sweep.png").stat().st_size > 0
    assert not list(out.glob("*.tmp"))


def test_budget_sweep_ends_and_monotone(tmp_path):
    res = _run(tmp_path, "--vocab", "2000", "--states", "2", "--n-sigma", "2", "--n-budgets", "6",
               "--no-plot")
    sweep = res["budget_sweep"]
    assert sweep["max_budget_error"] < 1e-5  # lambda_for_budget hits the budget
    pts = sweep["points"]
    assert pts[0]["budget"] <= 0.5 and pts[-1]["budget"] == 1.0
    assert pts[-1]["kl_after"] == pytest.approx(sweep["kl_before"], rel=1e-5)  # no rejection
    assert sweep["classic"]["kl_after"] == pytest.approx(0.0, abs=1e-6)
    assert sweep["classic"]["acceptance"] == pytest.approx(1 / sweep["classic"]["lambda"], rel=1e-5)
    kls = [p["kl_after"] for p in pts]  # a larger budget never lowers KL after (float32 slack)
    assert all(b >= a - 1e-6 for a, b in zip(kls, kls[1:], strict=False))
    assert not (tmp_path / "simulation.png").exists()


def test_toy_matches_hand_computation():
    # p_inf = (.45, .30, .15, .10), p_tgt = (.25, .35, .25, .15), lam = 1:
    # min = (.25, .30, .15, .10), Z = 0.80, p'_inf = (.3125, .375, .1875, .125)
    t = simulate.toy(1.0)
    assert t["acceptance"] == pytest.approx(0.80, abs=1e-12)
    assert t["p_inf_after"] == pytest.approx([0.3125, 0.375, 0.1875, 0.125], abs=1e-12)
    assert t["kl_after"] < t["kl_before"]


def test_default_protocol_meets_the_paper(tmp_path):
    """Lognormal family near KL before 0.009 at V = 32000: acceptance >= 0.95, KL reduced >= 10x.

    ~3-6 s on 2 shared cores, so not marked slow."""
    res = _run(tmp_path, "--n-sigma", "4", "--no-plot")  # default protocol, coarse grid + exact anchors
    assert res["vocab"] == 32000 and res["lambda"] == 1.0
    near = [p for p in res["families"]["lognormal"] if 0.005 <= p["kl_before"] <= 0.015]
    assert near
    for p in near:
        assert p["acceptance"] >= 0.95
        assert p["kl_before"] / p["kl_after"] >= 10.0
    assert res["goal"]["passed"]
