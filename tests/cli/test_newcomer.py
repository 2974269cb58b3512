"""The command line as a newcomer meets it: a new run directory per run, no dead end after an early crash,
torn metric lines skipped, every field and preset listed by `--help` / `jackpot config`, caches in one
configurable place shared by `jackpot pretrain` and `jackpot train`, a summary that says what happened
(also after Ctrl-C), and plots with honest axes written beside the run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import REPO, TINY, jackpot

from jackpot.cli import main as cli_main
from jackpot.errors import JackpotWarning
from jackpot.metrics import read_metrics
from jackpot.train import checkpoint as ckpt
from jackpot.train.config import Config, build_config, field_docs, presets


# ------------------------------------------------------------------------------------ run directories
def test_runs_without_out_get_their_own_directory_under_the_runs_root(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv("JACKPOT_RUNS_DIR", str(tmp_path / "runs"))
    args = ["train", "--no-progress", *TINY, f"cache_dir={cache}", "train.steps=1"]
    assert cli_main(args) == 0
    assert cli_main([*args, "correction.budget=0.9"]) == 0  # the README's second example after its first
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("decoupled-jackpot-") for r in runs)
    assert all((r / "summary.json").is_file() for r in runs)
    out = capsys.readouterr().out
    assert f"jackpot plot {runs[0]}" in out or f"jackpot plot {runs[1]}" in out


def test_default_out_is_unique_within_one_second(tmp_path, monkeypatch):
    from jackpot.train.cli import default_out

    monkeypatch.setenv("JACKPOT_RUNS_DIR", str(tmp_path))
    first = default_out(build_config(), now=0.0)
    first.mkdir()
    second = default_out(build_config(), now=0.0)
    assert second.name == first.name + "-2" and second.parent == tmp_path


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(tmp_path, cache, capsys):
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--out", str(out), *TINY, f"cache_dir={cache}", "train.steps=1"]
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n{"step": 1, "rew')  # killed in step 1
    with pytest.raises(FileExistsError, match="--resume"):
        cli_main(args)
    with pytest.warns(JackpotWarning, match="stopped before its first checkpoint: starting it again from step 0"):
        assert cli_main([*args, "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [0, 1]
    assert ckpt.latest_checkpoint(out).name == "step_000001"


def test_torn_metric_lines_are_skipped_with_a_warning_naming_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n{"step": 1}\nnull\n{"step": 2, "rew')
    with pytest.warns(JackpotWarning) as caught:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    messages = [str(w.message) for w in caught]
    assert any(f"{tmp_path / 'metrics.jsonl'}:4" in m for m in messages)
    assert any(f"{tmp_path / 'metrics.jsonl'}:3" in m for m in messages)


def test_torn_line_warning_on_the_command_line_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n{"step": 1, "reward/mean": 0.2}\n{"st')
    result = jackpot("plot", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if "metrics.jsonl" in ln]
    assert warnings == [f"jackpot: warning: {run / 'metrics.jsonl'}:3: skipped a line that is not a complete "
                        "metrics record (torn by an interrupted write?): '{\"st'"]
    assert (run / "plot.png").is_file()


# ------------------------------------------------------------------------------------ discoverability
def test_train_help_lists_every_field_and_preset(tmp_path):
    result = jackpot("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for name, (_default, doc) in field_docs().items():
        assert f"  {name} = " in result.stdout, name
        assert doc, f"{name} has no docstring"
    for preset in presets():
        assert f"  {preset} " in result.stdout
    assert "configs/tis.yaml" not in result.stdout  # no example that does not exist


def test_jackpot_config_shows_resolved_values_and_writes_a_usable_yaml(tmp_path):
    result = jackpot("config", "--config", "tis-reverse-kl", "train.steps=7", cwd=tmp_path)
    assert result.returncode == 0
    assert "  correction.name = tis\n" in result.stdout and "  train.steps = 7\n" in result.stdout
    assert "staleness-jackpot" in result.stdout
    text = jackpot("config", "--config", "tis-reverse-kl", "--yaml", cwd=tmp_path).stdout
    (tmp_path / "my.yaml").write_text(text)
    assert build_config(str(tmp_path / "my.yaml")) == build_config("tis-reverse-kl")
    assert yaml.safe_load(text)["correction"]["name"] == "tis"


def test_every_field_has_a_docstring():
    assert all(doc for _, doc in field_docs().values())
    assert len(field_docs()) > 60


def test_cache_location_is_configurable_and_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("JACKPOT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Config().cache_dir == str(tmp_path / "xdg" / "jackpot" / "models")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert Config().cache_dir == str(Path.home() / ".cache" / "jackpot" / "models")
    monkeypatch.setenv("JACKPOT_CACHE_DIR", str(tmp_path / "mine"))
    assert Config().cache_dir == str(tmp_path / "mine" / "models")
    assert build_config(None, ["cache_dir=/x"]).cache_dir == "/x"


# ------------------------------------------------------------------------------------ pre-training cache
def test_pretrain_and_train_share_one_cached_model(tmp_path, monkeypatch):
    from jackpot.train.models import model_dir
    from jackpot.train.pretrain import add_arguments
    from jackpot.train.pretrain import main as pretrain_main

    monkeypatch.setenv("JACKPOT_CACHE_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # `jackpot pretrain` with the task's defaults (no --task-arg); `jackpot train` passes {digits: 2}
    assert pretrain_main(parser.parse_args(["--hidden", "16", "--layers", "1", "--heads", "2", "--steps", "2",
                                            "--eval-n", "2", "--no-progress"])) == 0
    made = sorted((tmp_path / "models").iterdir())
    assert len(made) == 1
    cfg = build_config(None, ["policy.hidden_size=16", "policy.num_layers=1", "policy.num_heads=2",
                              "policy.sft_steps=2"])
    assert Path(model_dir("policy", cfg.policy, cfg, False)) == made[0]
    assert sorted((tmp_path / "models").iterdir()) == made  # nothing trained a second time


def test_cache_key_follows_task_defaults_and_data_contents(tmp_path):
    from jackpot.train.pretrain import TinyModelSpec

    assert TinyModelSpec(task_kwargs={}).cache_key() == TinyModelSpec(task_kwargs={"digits": 2}).cache_key()
    assert TinyModelSpec(task_kwargs={"digits": 3}).cache_key() != TinyModelSpec().cache_key()
    assert TinyModelSpec(name="a").cache_key() == TinyModelSpec(name="b").cache_key()
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    spec = TinyModelSpec(task="jsonl", task_kwargs={"path": str(data)})
    before = spec.cache_key()
    data.write_text('{"prompt": "1+1=", "answer": "3"}\n')  # edited in place: same path, other data
    assert spec.cache_key() != before


# ------------------------------------------------------------------------------------ summary
def test_summary_says_what_happened(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--no-progress", "--out", str(out), *TINY, f"cache_dir={cache}", "train.steps=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_before_se", "eval_after_se", "rollout_model_eval_before_se"):
        assert summary[key] is not None and summary[key] >= 0, key
    assert summary["run_dir"] == str(out.resolve()) and summary["mode"] == "decoupled"
    printed = capsys.readouterr().out
    assert "± " in printed and "mean train reward (rollout model's samples)" in printed
    assert "rollout model: trained jointly" in printed and "standard error over prompts" in printed
    assert f"jackpot plot {out.resolve()}" in printed


def test_summary_is_printed_after_ctrl_c(tmp_path, cache, capsys, monkeypatch):
    from jackpot.train import loop

    real_step = loop.train_step

    def step_then_interrupt(run, step):
        values = real_step(run, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 1: it finishes, saves and stops
        return values

    monkeypatch.setattr(loop, "train_step", step_then_interrupt)
    out = tmp_path / "run"
    assert cli_main(["train", "--no-progress", "--out", str(out), *TINY, f"cache_dir={cache}",
                     "train.steps=5"]) == 130
    captured = capsys.readouterr()
    printed = captured.out
    assert captured.err.strip().endswith(f"jackpot: interrupted after step 1; checkpoint saved in {out}")
    assert "(interrupted)" in printed and "policy eval accuracy, before" in printed
    assert f"jackpot train --out {out.resolve()} --resume" in printed and "stopped after step 1 of 5" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_summary_change_states_its_noise():
    from jackpot.train.summary import summary_rows

    base = {"eval_before": 0.364, "eval_after": 0.385, "eval_before_se": 0.02, "eval_after_se": 0.021,
            "steps": 300, "mode": "decoupled", "rollout_model_eval_before": 0.3, "rollout_model_eval_after": 0.25,
            "reward_mean": 0.3, "accept_rate_mean": 0.8, "actor_policy_kl_k3_mean": 0.1,
            "actor_policy_kl_k3_last": 0.1, "rollout_s_mean": 0.1, "update_s_mean": 0.1}
    change = dict(summary_rows(base))["policy eval accuracy, change"]
    assert change == "+0.021 ± 0.029 (within 2 standard errors)"  # hypot(0.02, 0.021) = 0.029
    change = dict(summary_rows({**base, "eval_after": 0.464}))["policy eval accuracy, change"]
    assert change == "+0.100 ± 0.029 (larger than 2 standard errors)"


# ------------------------------------------------------------------------------------ plots
def test_plot_axes_start_at_zero_and_the_plot_lands_beside_the_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jackpot.plot import default_out, set_limits

    fig, ax = plt.subplots()
    assert set_limits(ax, "eval/accuracy", [0.365, 0.385]) and ax.get_ylim() == (0.0, 1.0)
    assert set_limits(ax, "mismatch/kl_k3", [0.2, 0.4]) and ax.get_ylim()[0] == 0.0
    assert not set_limits(ax, "reward/mean", [-1.0, 0.5])  # outside [0, 1]: zoomed, and the title says so
    plt.close(fig)
    assert default_out([tmp_path / "a"]) == (tmp_path / "a" / "plot.png").resolve()
    assert default_out([tmp_path / "a-seed0", tmp_path / "a-seed1", tmp_path / "b"]) == \
        (tmp_path / "plot-a+b.png").resolve()


def test_output_piped_into_a_reader_that_left_ends_quietly(tmp_path):
    # `true` exits without reading (long before Python has started), so every write meets a closed pipe
    result = subprocess.run(f"{sys.executable} -c 'from jackpot.cli import run; run()' config | true", shell=True,
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.stderr == ""
