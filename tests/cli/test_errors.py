"""Every expected failure of the command line is one line `jackpot: error: ...` naming its cause, with a
non-zero exit and no traceback (JACKPOT_TRACEBACK=1 / --debug shows it); a failed checkpoint save leaves
the previous checkpoint loadable and nothing half-written. The CLI cases run `jackpot` as a subprocess,
as a user does."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, jackpot

from jackpot.errors import InputError, WriteError, describe
from jackpot.fileio import write_text_atomic
from jackpot.models.loading import build_tiny_qwen, save_model_and_tokenizer
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.train import checkpoint as ckpt
from jackpot.train.config import build_config
from jackpot.train.threads import available_cpus, choose_threads, default_threads


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `jackpot: error:` line of a failed run (asserting there is nothing else, no traceback)."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("jackpot: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_char_tokenizer()
    model = build_tiny_qwen(len(tok), hidden_size=16, num_layers=1, num_heads=2, seed=0,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id)
    return save_model_and_tokenizer(model, tok, tmp_path_factory.mktemp("models") / "good")


def _broken(model_dir: Path, tmp_path: Path, case: str) -> Path:
    broken = tmp_path / case
    shutil.copytree(model_dir, broken)
    if case == "bad-json":
        (broken / "config.json").write_text("{not json")
    elif case == "truncated":
        weights = broken / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    elif case == "no-weights":
        (broken / "model.safetensors").unlink()
    return broken


@pytest.mark.parametrize("case, expected", [
    ("bad-json", "config.json is not valid JSON"),
    ("truncated", "model.safetensors is truncated"),
    ("no-weights", "has no weights"),
])
def test_broken_model_directory_is_one_line_naming_the_file(model_dir, tmp_path, case, expected):
    broken = _broken(model_dir, tmp_path, case)
    line = one_error_line(jackpot("train", "--out", str(tmp_path / "run"), f"policy.path={broken}",
                                  "train.mode=on-policy", "train.threads=1"))
    assert expected in line and str(broken) in line
    assert not (tmp_path / "run").exists()  # nothing created for a run that never started


@pytest.mark.parametrize("device, expected", [
    ("gpu", "train.device='gpu' is not a torch device"),
    pytest.param("cuda", "train.device='cuda' but", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="needs a machine where CUDA is not available")),
])
def test_unusable_device_is_one_line(tmp_path, device, expected):
    line = one_error_line(jackpot("train", "--out", str(tmp_path / "run"), f"train.device={device}"))
    assert expected in line and "train.device=cpu" in line


@pytest.mark.slow
def test_traceback_on_request(tmp_path):
    for run in (jackpot("train", "--out", str(tmp_path / "r"), "train.device=gpu", env={"JACKPOT_TRACEBACK": "1"}),
                jackpot("--debug", "train", "--out", str(tmp_path / "r"), "train.device=gpu"),
                jackpot("train", "--out", str(tmp_path / "r"), "train.device=gpu", "--debug")):
        assert run.returncode != 0 and "Traceback" in run.stderr and "is not a torch device" in run.stderr


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "http://127.0.0.1:9 cannot be reached"),  # nothing listens on port 9
])
def test_hub_id_offline_fails_fast_and_says_how_to_use_a_local_directory(tmp_path, env, expected):
    line = one_error_line(jackpot("train", "--out", str(tmp_path / "run"), "policy.path=Qwen/Qwen3-0.6B",
                                  "train.mode=on-policy", env=env))
    assert expected in line and "'Qwen/Qwen3-0.6B'" in line and "policy.path=DIR" in line


def test_unreadable_task_data_is_one_line_naming_the_file(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\xff\xfe\x00 not text\n")
    line = one_error_line(jackpot("train", "--out", str(tmp_path / "run"), "task.name=jsonl",
                                  f"task.options={{path: {data}}}"))
    assert str(data) in line and "task.name=jsonl" in line
    line = one_error_line(jackpot("train", "--out", str(tmp_path / "run"), "task.name=jsonl",
                                  f"task.options={{path: {tmp_path / 'missing.jsonl'}}}"))
    assert "missing.jsonl" in line


# root ignores file permissions; without the capability that lets it, it is refused like anyone else
AS_UNPRIVILEGED = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()


@pytest.mark.skipif(bool(AS_UNPRIVILEGED) and shutil.which("setpriv") is None, reason="root without setpriv")
def test_permission_denied_on_out_is_one_line(tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    try:
        line = one_error_line(jackpot("train", "--out", str(parent / "run"), "train.threads=1",
                                      wrapper=AS_UNPRIVILEGED))
        assert "Permission denied" in line and str(parent / "run") in line and "--out" in line
    finally:
        parent.chmod(0o755)


# A save that fails like a full disk: the first model file is half written, then ENOSPC (optionally from
# safetensors, whose error is not an OSError).
FULL_DISK_AT_STEP_2 = """
import errno, jackpot.train.checkpoint as c
_save = c.save_file
def save_file(tensors, filename, *a, **k):
    if "step_000002" in filename:
        open(filename, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return _save(tensors, filename, *a, **k)
c.save_file = save_file
"""


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = [*TINY, f"cache_dir={cache}", "train.steps=2", "train.checkpoint_every=1", "train.threads=1"]
    line = one_error_line(jackpot("train", "--no-progress", "--out", str(out), *args, prelude=FULL_DISK_AT_STEP_2))
    assert "No space left on device" in line and "step_000002" in line and "step_000001 is kept" in line
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # no temporary directory left
    cfg = build_config(None, args)
    from jackpot.train.loop import setup

    run = setup(cfg, tmp_path / "fresh")
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out), run.models, run.optimizers)
    assert state["step"] == 1
    run.logger.close()


def test_failed_checkpoint_save_cleans_up_and_names_the_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    first = ckpt.save_checkpoint(tmp_path, 1, {"policy": model}, {"policy": opt})

    class SafetensorError(Exception):  # safetensors reports a full disk as its own exception type
        pass

    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(WriteError) as info:
        ckpt.save_checkpoint(tmp_path, 2, {"policy": model}, {"policy": opt})
    assert info.value.errno == errno.ENOSPC and "step_000002" in str(info.value) and str(first) in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert ckpt.latest_checkpoint(tmp_path) == first
    monkeypatch.undo()
    ckpt.load_checkpoint(first, {"policy": torch.nn.Linear(2, 2)}, {"policy": opt})


def test_atomic_write_failure_keeps_the_old_file_and_no_tmp(tmp_path):
    path = write_text_atomic(tmp_path / "summary.json", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from jackpot.fileio import write_atomic

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_describe_separates_expected_failures_from_bugs():
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/x/y")).startswith("no space left on device")
    assert describe(PermissionError(errno.EACCES, "Permission denied", "/x")).startswith("permission denied: /x")
    assert describe(InputError("a\nb")) == "a b"  # one line
    assert describe(ImportError("needs peft: pip install 'jackpot[lora]'")).endswith("jackpot[lora]'")
    assert describe(RuntimeError("a bug")) is None and describe(KeyError("k")) is None
    assert describe(ValueError("a bug deep in torch")) is None  # only the project's own checks are expected
    assert describe(IndexError("i")) is None and describe(AttributeError("a")) is None
    assert isinstance(InputError("x"), ValueError)  # `except ValueError` in users' code keeps catching it


def test_config_errors_are_input_errors():
    """Reading and checking a config rejects the user's input: one line on the command line."""
    with pytest.raises(InputError, match="train.steps must be a positive integer"):
        build_config(None, ["train.steps=0"])
    with pytest.raises(InputError, match=r"override 'task.options=\{digits: 2' is not valid YAML"):
        build_config(None, ["task.options={digits: 2"])  # a YAML syntax error in an override
    with pytest.raises(InputError, match="unknown config key"):
        build_config(None, ["train.stpes=2"])


def test_an_unexpected_exception_keeps_its_traceback(tmp_path):
    result = jackpot("plot", str(tmp_path), prelude="import jackpot.plot as p\n"
                     "def boom(*a, **k): raise RuntimeError('a bug')\np.plot_runs = boom")
    assert result.returncode != 0 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


# A bug inside the training step: a plain ValueError (as torch raises for mismatched shapes) from the update.
BUG_IN_THE_UPDATE = """
import jackpot.train.loop as loop
def update(*a, **k):
    raise ValueError("shape mismatch deep inside the update")
loop.update = update
"""


def test_a_plain_value_error_inside_the_training_step_keeps_its_traceback(tmp_path):
    result = jackpot("train", "--no-progress", "--out", str(tmp_path / "run"), *TINY,
                     f"cache_dir={tmp_path / 'cache'}", "train.steps=1", "train.threads=1", prelude=BUG_IN_THE_UPDATE)
    assert result.returncode != 0 and "jackpot: error" not in result.stderr, result.stderr
    assert "Traceback" in result.stderr and "ValueError: shape mismatch deep inside the update" in result.stderr
    assert "in train_step" in result.stderr  # the frames that lead to the bug are shown


# ------------------------------------------------------------------------------------------------ threads
def test_threads_default_to_one_for_tiny_models_and_all_usable_cpus_otherwise(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr("jackpot.train.threads.CGROUP_CPU_MAX", Path("/nonexistent"))
    assert available_cpus() == 3
    assert default_threads(build_config())[0] == 1  # the offline default: 0.65M and 0.11M parameters
    big = build_config(None, ["policy.hidden_size=1024", "policy.num_layers=8"])
    assert default_threads(big)[0] == 3
    assert default_threads(build_config(None, ["policy.path=somewhere"]))[0] == 3  # a checkpoint: size unknown
    assert choose_threads(build_config(None, ["train.threads=5"])) == (5, "train.threads")
    # several processes on one node (torchrun / accelerate set LOCAL_WORLD_SIZE) share the usable CPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert default_threads(big)[0] == 2
    assert default_threads(build_config())[0] == 1


def test_available_cpus_honours_a_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr("jackpot.train.threads.CGROUP_CPU_MAX", quota)
    quota.write_text("250000 100000\n")
    assert available_cpus() == 2
    quota.write_text("max 100000\n")
    assert available_cpus() == 8


def test_summary_reports_the_threads_used(tmp_path):
    from jackpot.cli import main

    args = ["train", "--no-progress", "--out", str(tmp_path / "run"), *TINY, f"cache_dir={tmp_path / 'c'}",
            "train.steps=1"]
    try:
        assert main([*args, "train.threads=2"]) == 0
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["threads"] == 2 == torch.get_num_threads() and summary["threads_why"] == "train.threads"
    finally:
        torch.set_num_threads(1)


def test_pretrain_with_a_negative_evaluation_count_is_one_line(tmp_path):
    line = one_error_line(jackpot("pretrain", "--eval-n", "-1", "--out", str(tmp_path / "m")))
    assert "--eval-n must be >= 0, got -1" in line
