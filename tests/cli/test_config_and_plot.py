"""Config files, presets and overrides; the metric logger; `jackpot plot`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jackpot.cli import main as cli_main
from jackpot.metrics import MetricLogger, read_metrics
from jackpot.plot import plot_runs
from jackpot.train.config import Config, build_config
from jackpot.train.config_io import CONFIG_DIR, parse_overrides


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_builds(preset):
    cfg = build_config(str(CONFIG_DIR / f"{preset}.yaml"))
    assert isinstance(cfg, Config)


def test_preset_chain_and_overrides_take_precedence(tmp_path):
    # staleness-jackpot extends staleness-noclip extends staleness-clip
    cfg = build_config(str(CONFIG_DIR / "staleness-jackpot.yaml"), ["train.minibatches=4"])
    assert cfg.train.mode == "on-policy" and cfg.train.clip_eps is None
    assert cfg.correction.name == "jackpot" and cfg.correction.target == "new"
    assert cfg.train.minibatches == 4
    user = tmp_path / "mine.yaml"
    user.write_text("preset: tis-reverse-kl\ncorrection:\n  cap: 5\npolicy:\n  lr: 1e-5\n")
    cfg = build_config(str(user))
    assert cfg.correction.name == "tis" and cfg.correction.cap == 5.0 and cfg.policy.lr == 1e-5
    # untouched fields keep the role-specific defaults
    assert cfg.rollout_model.hidden_size == Config().rollout_model.hidden_size


def test_task_options_are_replaced_not_merged_and_completed_by_the_tasks_own_defaults():
    cfg = build_config(None, ["task.name=chain_sum", "task.options={terms: 2}"])
    assert cfg.task.options == {"terms": 2, "digits": 1, "eval_fraction": 0.1}
    assert build_config().task.options == {"digits": 2, "eval_fraction": 0.1}
    assert build_config().sampling.max_new_tokens == 6


def test_a_file_task_alone_gets_no_other_tasks_options_and_records_its_verifier(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "answer": "1"}\n')
    for name in ("jsonl", "file"):
        cfg = build_config(None, [f"task.name={name}", f"task.options.path={data}"])
        assert "digits" not in cfg.task.options and cfg.task.options["verifier"] == "math"
        assert cfg.sampling.max_new_tokens == 1024
    cfg = build_config(None, ["task.name=file", f"task.options.path={data}", "sampling.max_new_tokens=64"])
    assert cfg.sampling.max_new_tokens == 64
    with pytest.raises(ValueError, match=r"task 'file' needs option\(s\) \['path'\]"):
        build_config(None, ["task.name=file"])
    with pytest.raises(ValueError, match="rollout.engine must be one of"):
        build_config(None, ["rollout.engine=sglang"])


def test_override_syntax_errors():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ValueError, match="section.field=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ValueError, match="train.steps must be an integer"):
        build_config(None, ["train.steps=2.5"])


def test_metric_logger_truncates_on_resume(tmp_path):
    log = MetricLogger(tmp_path, tensorboard=True)
    for step in range(4):
        log.log(step, {"x": float(step), "y": float("nan")})
    log.close()
    assert [r["y"] for r in read_metrics(tmp_path)] == [None] * 4  # NaN is written as null, still valid JSON
    MetricLogger(tmp_path, tensorboard=False, resume_step=1).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert any((tmp_path / "tensorboard").iterdir())


def test_metric_logger_mirrors_to_wandb_and_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricLogger(tmp_path, tensorboard=False, wandb_project="jackpot-test", config={"train": {"steps": 3}})
    first_id = log._wandb.id
    for step in range(3):
        log.log(step, {"reward/mean": 0.1 * step})
    log.close()
    assert wandb.run is None  # finished
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and offline_runs[0].name.endswith(first_id)
    assert any(f.suffix == ".wandb" for f in offline_runs[0].iterdir())  # the event log W&B syncs from
    log = MetricLogger(tmp_path, tensorboard=False, wandb_project="jackpot-test", resume_step=1)
    assert log._wandb.id == first_id  # --resume continues the same W&B run
    log.close()


def _fake_run(path: Path, offset: float) -> Path:
    path.mkdir(parents=True)
    rows = [{"step": s, "reward/mean": 0.1 * s + offset, "mismatch/kl_k3": 0.01 / (s + 1),
             "obrs/accept_rate": 0.9, **({"eval/accuracy": 0.2 + offset} if s % 2 == 0 else {})} for s in range(5)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_overlays_runs_and_groups_seeds(tmp_path):
    runs = [_fake_run(tmp_path / f"jackpot-seed{i}", 0.01 * i) for i in range(2)] + [_fake_run(tmp_path / "tis", 0.0)]
    out = tmp_path / "plot.png"
    assert cli_main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_distillation_coefficient_when_a_run_logs_it(tmp_path):
    """A fifth panel, the rollout model's distillation coefficient, only when some run logs it: the figure is
    4.2 inches (504 pixels at 120 dpi) wider. The width is read from the PNG header."""
    import struct

    plain = _fake_run(tmp_path / "plain", 0.0)
    controlled = _fake_run(tmp_path / "controlled", 0.0)
    rows = [{**json.loads(line), "rollout_model/distill_coef": 1.1 ** s}
            for s, line in enumerate((controlled / "metrics.jsonl").read_text().splitlines())]
    (controlled / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    widths = []
    for runs in ([plain], [plain, controlled]):
        out = plot_runs(runs, tmp_path / f"{len(runs)}.png")
        widths.append(struct.unpack(">I", out.read_bytes()[16:20])[0])
    assert widths == [4 * 504, 5 * 504]


def test_the_coefficient_is_drawn_on_a_log_axis():
    """The controller moves the coefficient by factors: a log axis (0.01 to 100 over four decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jackpot.plot import set_limits

    fig, (coef, kl) = plt.subplots(1, 2)
    assert set_limits(coef, "rollout_model/distill_coef", [0.01, 1.0, 100.0]) and coef.get_yscale() == "log"
    assert set_limits(kl, "mismatch/kl_k3", [0.1, 0.5]) and kl.get_yscale() == "linear"
    fig.delaxes(coef)
    zero = fig.add_subplot(1, 2, 1)  # distill.coef = 0 (decoupled-none): a linear axis from 0
    assert set_limits(zero, "rollout_model/distill_coef", [0.0, 0.0]) and zero.get_yscale() == "linear"
    assert zero.get_ylim()[0] == 0
    plt.close(fig)


def test_plot_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        cli_main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "p.png")])


def test_console_entry_point_prints_one_line_errors(capsys, monkeypatch):
    from jackpot.cli import run

    monkeypatch.delenv("JACKPOT_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["jackpot", "train", "train.steps=0"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "jackpot: error: train.steps must be a positive integer, got 0"


def test_wandb_project_without_wandb_installed_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricLogger(tmp_path, tensorboard=False, wandb_project="p")


def test_presets_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from jackpot.train.config import presets

    monkeypatch.chdir(tmp_path)  # not the source checkout: presets ship inside the package
    assert "tis-reverse-kl" in presets() and "staleness-jackpot" in presets()
    assert build_config("tis-reverse-kl").correction.name == "tis"
    assert build_config("staleness-jackpot").correction.target == "new"  # a preset naming another preset
    with pytest.raises(FileNotFoundError, match="presets: .*on-policy"):
        build_config("no-such-preset")


@pytest.mark.parametrize(("preset", "policy", "rollout"), [
    ("qwen3-1.7b-to-8b", "Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B"),
    ("qwen2.5-1.5b-to-3b", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-1.5B"),
])
def test_real_pair_presets_build_with_the_papers_batch_shape(preset, policy, rollout):
    cfg = build_config(preset)
    assert (cfg.policy.path, cfg.rollout_model.path) == (policy, rollout)
    assert cfg.policy.dtype == cfg.rollout_model.dtype == "bfloat16" and cfg.policy.gradient_checkpointing
    assert (cfg.train.prompts_per_step, cfg.sampling.max_new_tokens, cfg.train.eval_samples) == (64, 8192, 4)
    assert cfg.task.name == "file" and cfg.task.options["verifier"] == "math" and cfg.correction.name == "jackpot"
    assert "{prompt}" in cfg.task.options["template"] and "\\boxed{{}}" in cfg.task.options["template"]
    two_paths = build_config(preset, ["policy.path=/ckpt/p", "rollout_model.path=/ckpt/r"])
    assert (two_paths.policy.path, two_paths.rollout_model.path) == ("/ckpt/p", "/ckpt/r")


def test_plot_x_axes_sum_the_per_step_costs(tmp_path):
    """--x flops / seconds / gpu-model: a point at step s stands at the sum of the axis' metric over steps 1..s;
    a run without it, or an unknown axis, is refused in one line."""
    from jackpot.errors import InputError
    from jackpot.plot import x_positions

    run = _fake_run(tmp_path / "costed", 0.0)
    rows = [{**json.loads(line), **({"perf/flops": 10.0 * s, "perf/step_s": 0.5, "perf/gpu_model_s": 1e-6}
                                    if s > 0 else {})}
            for s, line in enumerate((run / "metrics.jsonl").read_text().splitlines())]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_metrics(run)
    assert x_positions(records, "flops") == {0: 0.0, 1: 10.0, 2: 30.0, 3: 60.0, 4: 100.0}
    assert x_positions(records, "seconds") == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}
    assert x_positions(records, "steps") == {s: float(s) for s in range(5)}
    for x in ("steps", "flops", "seconds", "gpu-model"):
        out = tmp_path / f"{x}.png"
        assert cli_main(["plot", str(run), "--out", str(out), "--x", x]) == 0 and out.is_file()
    old = _fake_run(tmp_path / "old", 0.0)
    with pytest.raises(InputError, match=r"^--x flops: the run logs no perf/flops .*--x steps$") as err:
        plot_runs([old], tmp_path / "old.png", x="flops")
    with pytest.raises(InputError, match=r"^--x must be one of steps, flops, seconds, gpu-model, got 'tokens'$"):
        plot_runs([run], tmp_path / "bad.png", x="tokens")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"^--x must be one of"):  # the command line: `jackpot: error: ...`
        cli_main(["plot", str(run), "--x", "tokens", "--out", str(tmp_path / "bad.png")])
