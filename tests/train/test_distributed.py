"""Several processes (gloo on CPU) against one: the same global batch and seed give the same run.

Each case runs `tests/train/dist_worker.py` for 2 steps in one process and under
`torchrun --nproc_per_node 2`, and compares, per step, the whole batch's rows (sampled ids, rewards,
the correction's mask exactly; log-probs and weights to float32 reduction-order noise), every logged
metric, and both models' parameters after the 2 steps. Micro-batching is on (micro_batch_size 3: each
rank's 8 rows are 3 + 3 + 2, one process's 16 rows 6 micro-batches). Then the CLI: `torchrun -m jackpot
train` with a resume from its sharded checkpoint continues exactly.

Tolerances: one process and two differ only in the order of float32 sums (batch size 8 vs 16 in the
matmuls, gradients all-reduced over 2 ranks), so values agree to ~1e-6 here; parameters after two
AdamW steps within 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_MODELS

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train" / "dist_worker.py"
BASE = [*TINY_MODELS, "train.threads=1", "train.prompts_per_step=4", "train.group_size=4", "train.eval_prompts=4",
        "train.eval_samples=2", "train.micro_batch_size=3", "tensorboard=false", "policy.lr=1e-3",
        "rollout_model.lr=1e-3"]
CASES = {
    "on-policy": ["train.mode=on-policy"],
    "jackpot-exact-z": ["correction.z=exact"],
    "jackpot-topk-z-kappa": ["correction.z=topk"],
    "jackpot-budget": ["correction.budget=0.8"],
    # the correction recomputed per mini-batch from the current policy; 2 mini-batches split unevenly over
    # the ranks (padding micro-batches)
    "target-new-two-minibatches": ["correction.z=topk", "correction.target=new", "train.minibatches=2"],
    "fsdp-both-models": ["correction.z=exact", "parallel.policy=fsdp", "parallel.rollout_model=fsdp"],
    "fsdp-policy-frozen-ddp-rollout": ["correction.budget=0.8", "parallel.policy=fsdp",
                                       "distill.rollout_model=frozen"],
    # the KL-to-init reference sharded like the policy
    "fsdp-kl-to-init": ["correction.z=exact", "parallel.policy=fsdp", "train.kl_coef=0.5"],
    # a generator per process, batches one step ahead; the weight copies gathered from FSDP2 shards
    "async-fsdp-rollout-model": ["rollout.async_steps=1", "parallel.rollout_model=fsdp"],
}
EXACT_ROWS = ("response_ids", "response_mask", "rewards", "keep")
ATOL = 1e-5


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def _run_worker(tmp: Path, name: str, processes: int, overrides: list[str], cache: Path) -> dict:
    out = tmp / f"{name}.pt"
    launcher = [sys.executable] if processes == 1 else _torchrun(processes)
    cmd = [*launcher, str(WORKER), str(out), str(tmp / name), "2", *BASE, *overrides, f"cache_dir={cache}"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(tmp_path, cache, case):
    assert_two_equal_one(tmp_path, cache, CASES[case])


def assert_two_equal_one(tmp_path: Path, cache: Path, overrides: list[str]) -> None:
    """The worker's 2 steps in one process and in two agree (module docstring); also used by the vLLM tests."""
    one = _run_worker(tmp_path, "one", 1, overrides, cache)
    two = _run_worker(tmp_path, "two", 2, overrides, cache)
    assert (one["world"], two["world"]) == (1, 2)
    for step, (a, b) in enumerate(zip(one["steps"], two["steps"], strict=True), 1):
        assert a["rows"].keys() == b["rows"].keys()
        for key in a["rows"]:
            x, y = a["rows"][key], b["rows"][key]
            w = min(x.shape[1], y.shape[1])  # each rank pads to its own longest response; the rest is padding
            assert not x[:, w:].any() and not y[:, w:].any(), key
            if key in EXACT_ROWS:
                assert torch.equal(x[:, :w], y[:, :w]), f"step {step}: {key} differs"
            else:
                torch.testing.assert_close(x[:, :w], y[:, :w], atol=ATOL, rtol=0, msg=f"step {step}: {key}")
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in a["metrics"].items():
            assert b["metrics"][key] == pytest.approx(value, rel=1e-4, abs=ATOL), f"step {step}: {key}"
        # the comparison discriminates: groups have a reward spread and the policy takes a real step
        assert a["rows"]["rewards"].reshape(4, 4).std(1).gt(0).any()
        assert a["metrics"]["policy/grad_norm"] > 1e-3
    if "train.mode=on-policy" not in overrides and "keep" in one["steps"][0]["rows"]:
        rows = [s["rows"] for s in one["steps"]]
        assert any((r["keep"] < r["response_mask"]).any() for r in rows), "no token rejected: mask not tested"
    # the evaluation: prompts split over the ranks, scores gathered (the dense test reward: not all equal)
    assert one["eval"] == pytest.approx(two["eval"], rel=1e-6) and 0 < one["eval"]["eval/accuracy"]
    for name in one["params"]:
        assert one["params"][name].keys() == two["params"][name].keys()
        for key, p in one["params"][name].items():
            torch.testing.assert_close(two["params"][name][key], p, atol=ATOL, rtol=1e-4, msg=f"{name}.{key}")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_resume_from_a_two_process_checkpoint_continues_exactly(tmp_path, cache):
    """`torchrun -m jackpot train`: 3 steps straight equal 2 steps, then --resume to 3, from the sharded
    checkpoint (torch.distributed.checkpoint); rank 0 alone writes metrics and the summary. One process
    resuming the same checkpoint continues alike (float32 reduction order aside)."""
    args = [*_torchrun(2), "-m", "jackpot", "train", "--no-progress", *BASE, f"cache_dir={cache}",
            "train.checkpoint_every=1", "correction.z=topk"]
    for out, extra in (("full", ["train.steps=3"]), ("cut", ["train.steps=2"]),
                       ("cut", ["train.steps=3", "--resume"])):
        if extra[-1] == "--resume":  # the same checkpoint, to be resumed by one process below
            shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
        proc = subprocess.run([*args, "--out", str(tmp_path / out), *extra], env=_env(), capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("policy eval accuracy, after") == 1, "the summary is printed once (rank 0)"
    # one process resumes the 2-process checkpoint (DCP loads into unsharded models) and continues alike
    one = [sys.executable, "-m", "jackpot", *args[args.index("train"):], "--out", str(tmp_path / "cut1"),
           "train.steps=3", "--resume"]
    proc = subprocess.run(one, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "cut" / "checkpoints" / (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / ".metadata").is_file() and json.loads((ckpt / "state.json").read_text())["processes"] == 2
    assert not list((tmp_path / "cut" / "checkpoints").glob(".tmp_*"))
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in full] == [r["step"] for r in cut] == [0, 1, 2, 3]
    for key, value in full[3].items():
        if not key.startswith("perf/"):
            assert cut[3][key] == value, key  # same ranks, same seeds: bitwise-identical arithmetic
    cut1 = _metrics(tmp_path / "cut1")
    assert [r["step"] for r in cut1] == [0, 1, 2, 3]
    for key, value in full[3].items():
        if not key.startswith("perf/"):
            assert cut1[3][key] == pytest.approx(value, rel=1e-4, abs=ATOL), key
    # the exported Hugging Face directories (rank 0 writes; the one-process continuation agrees)
    a, b = _exported(tmp_path / "full" / "final" / "policy"), _exported(tmp_path / "cut1" / "final" / "policy")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=1e-4, msg=key)


def _exported(path: Path) -> dict:
    """An exported directory's weights, loaded as a model (shapes checked against its config)."""
    from jackpot.models.loading import load_model, load_tokenizer

    load_tokenizer(str(path))
    return load_model(str(path), dtype="float32", device=torch.device("cpu")).state_dict()


def test_accelerate_launch_runs_the_same_training(tmp_path, cache):
    """`accelerate launch --multi_gpu --num_processes 2 -m jackpot train` (accelerate starts torchrun's
    workers; on CPU they join over gloo) makes the run torchrun makes — here with an FSDP2-sharded policy,
    whose exported final weights (gathered from the shards) are the same too."""
    common = ["--no-progress", *BASE, f"cache_dir={cache}", "train.steps=2", "parallel.policy=fsdp"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                  "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"]
    for out, launcher in (("torchrun", _torchrun(2)), ("accelerate", accelerate)):
        proc = subprocess.run([*launcher, "-m", "jackpot", "train", "--out", str(tmp_path / out), *common],
                              env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "accelerate" / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "state.json").read_text())["processes"] == 2
    a, b = _metrics(tmp_path / "torchrun"), _metrics(tmp_path / "accelerate")
    assert [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in a] == \
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in b]
    x, y = (_exported(tmp_path / run / "final" / "policy") for run in ("torchrun", "accelerate"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_ctrl_c_on_one_rank_saves_and_stops_every_rank(tmp_path, cache):
    """SIGINT to rank 1 alone: both ranks finish the step, save the same checkpoint and stop."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([*_torchrun(2), "-m", "jackpot", "train", "--no-progress", "--out", str(out), *BASE,
                             f"cache_dir={cache}", "train.steps=500", "train.checkpoint_every=1000",
                             "train.eval_every=1000"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "metrics.jsonl").is_file() or len(_metrics(out)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        ranks = {}
        for pid in workers:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks[int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])] = pid
        os.kill(ranks[1], signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = _metrics(out)[-1]["step"]
    assert last < 500, "the run was not stopped"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:06d}", "the checkpoint is not the last logged step's"
    state = json.loads((out / "checkpoints" / latest / "state.json").read_text())
    assert state == {"step": last, "processes": 2}
    assert "interrupted" in err


def test_fsdp_mixed_precision_computes_in_bfloat16(tmp_path, cache):
    """parallel.mixed_precision=bfloat16: FSDP2 computes in bf16 with float32 master weights — the run stays
    close to float32 (not equal: the option acts) and the weights stay float32."""
    common = ["correction.z=exact", "parallel.policy=fsdp", "parallel.rollout_model=fsdp"]
    fp32 = _run_worker(tmp_path, "fp32", 2, common, cache)
    bf16 = _run_worker(tmp_path, "bf16", 2, [*common, "parallel.mixed_precision=bfloat16"], cache)
    a, b = fp32["steps"][0]["metrics"], bf16["steps"][0]["metrics"]
    assert b["policy/grad_norm"] == pytest.approx(a["policy/grad_norm"], rel=0.05)
    diffs = []
    for name in fp32["params"]:
        for key, p in fp32["params"][name].items():
            q = bf16["params"][name][key]
            assert q.dtype == p.dtype == torch.float32
            diffs.append((q - p).abs().max().item())
    assert 1e-6 < max(diffs) < 0.02


FAILING_SAVE = """
import errno, os, sys
import torch
import torch.distributed.checkpoint.filesystem as fs
from jackpot.train import checkpoint as ckpt
from jackpot.train.distributed import Collective

coll = Collective.from_env("cpu")
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
run = sys.argv[1]
ckpt.save_checkpoint(run, 1, {"policy": model}, {"policy": opt}, coll=coll)
real = fs.FileSystemWriter.write_data
def full_disk(self, plan, planner):
    if coll.rank == 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, plan, planner)
fs.FileSystemWriter.write_data = full_disk
try:
    ckpt.save_checkpoint(run, 2, {"policy": model}, {"policy": opt}, coll=coll)
except Exception as e:
    print(f"rank {coll.rank}: {type(e).__name__}: {e}")
coll.barrier()
"""


def test_a_failed_sharded_save_keeps_the_previous_checkpoint(tmp_path):
    """A write failing on one rank (full disk): every rank gets the error naming the kept checkpoint, no
    temporary directory is left and `latest` still names the previous, loadable checkpoint."""
    script = tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE)
    proc = subprocess.run([*_torchrun(2), str(script), str(tmp_path / "run")], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, proc.stdout
    for line in lines:  # rank 1's own error, named on every rank, with the checkpoint that is kept
        assert "No space left on device" in line and "FrameSummary" not in line, line
        assert "step_000002" in line and "step_000001 is kept" in line, line
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000001"
    assert not list(root.glob(".tmp_*")) and not (root / "step_000002").exists()
    assert (root / "step_000001" / ".metadata").is_file()


def test_a_one_process_checkpoint_is_refused_by_several_processes(tmp_path, cache):
    common = ["--no-progress", *BASE, f"cache_dir={cache}", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "jackpot", "train", *common, "train.steps=1"], env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([*_torchrun(2), "-m", "jackpot", "train", *common, "train.steps=2", "--resume"],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0 and "was written by one process: resume it with one process" in proc.stderr
