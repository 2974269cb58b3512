"""benchmarks/decoupled_floor.py and bench_decoupled_speed.py's arguments: which components make each
variant's floor (from its config, by hand), presets as defaults, bad variant names refused in one line, and
the step-peak memory probe. No model runs here (tests/benchmarks/test_benchmarks.py smoke-runs the script)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from bench_helpers import benchmark_module

bench = benchmark_module("bench_decoupled_speed")
floor = sys.modules["decoupled_floor"]  # imported by bench_decoupled_speed from the same folder
# each component a distinct power of two: a floor's sum says exactly which components it counts
COMP = {name: float(2 ** i) for i, name in enumerate(floor.COMPONENTS)}


def _cfg(overrides):
    from jackpot.train.config import build_config

    return build_config(None, overrides)


def _sum(*names):
    return sum(COMP[n] for n in names)


@pytest.mark.parametrize(("variant", "rollout", "prepare", "update"), [
    ("on-policy", ["gen policy"], ["body policy", "head policy"], ["train policy", "opt policy"]),
    # exact Z: both bodies and one pass over both heads (which gives both sampled log-probs and Z)
    ("jackpot joint", ["gen rollout"], ["body policy", "body rollout", "exact Z"],
     ["train policy", "opt policy", "train rollout", "opt rollout"]),
    ("jackpot frozen", ["gen rollout"], ["body policy", "body rollout", "exact Z"], ["train policy", "opt policy"]),
    # top-k Z: the engine's recorded log-probs and top-K serve; no rollout-model forward in the floor
    ("jackpot joint topk", ["gen rollout"], ["body policy", "head policy"],
     ["train policy", "opt policy", "train rollout", "opt rollout"]),
    ("jackpot frozen topk", ["gen rollout"], ["body policy", "head policy"], ["train policy", "opt policy"]),
])
def test_floor_counts_what_the_variant_cannot_avoid(variant, rollout, prepare, update):
    got = floor.floor_of(_cfg(bench.VARIANTS[variant]), COMP)
    want = {"rollout": _sum(*rollout), "prepare": _sum(*prepare), "update": _sum(*update)}
    assert {k: got[k] for k in floor.PHASES} == want
    assert got["step"] == sum(want.values())


def test_a_decoupled_tis_variant_needs_no_rollout_forward():
    got = floor.floor_of(_cfg(["correction.name=tis", "distill.rollout_model=frozen"]), COMP)
    assert got["prepare"] == _sum("body policy", "head policy")


def test_preset_sets_defaults_and_explicit_flags_win():
    args, variants = bench._arguments(["--preset", "body", "--batch", "4"])
    assert (args.pairs, args.vocab, args.length, args.batch) == (["192x8:512x8"], 32768, 128, 4)
    assert list(variants) == list(bench.VARIANTS)
    args, _ = bench._arguments(["--preset", "vllm-table"])
    assert (args.pairs, args.vocab, args.batch, args.length) == (["64x2:256x4"], 151936, 2, 512)


def test_variants_are_picked_and_added_with_their_overrides():
    _, variants = bench._arguments(["--variants", "on-policy", "--add-variant", "frozen tis", "correction.name=tis",
                                    "distill.rollout_model=frozen"])
    assert variants == {"on-policy": bench.VARIANTS["on-policy"],
                        "frozen tis": ["correction.name=tis", "distill.rollout_model=frozen"]}


@pytest.mark.parametrize(("argv", "message"), [
    (["--variants", "no-such"], "unknown variant(s) ['no-such']"),
    (["--variants", "on-policy", "--profile", "jackpot joint"], "--profile 'jackpot joint' is not a variant"),
])
def test_bad_variant_names_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench._arguments(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_step_peak_sees_a_transient_allocation():
    with floor.StepPeak() as peak:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        del x
    assert peak.extra_mib is not None and peak.extra_mib >= 60
    assert peak.peak_mib >= peak.extra_mib
