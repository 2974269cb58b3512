#!/usr/bin/env bash
# The GPU check: one command, a few minutes on one H100, no network. Run from the repository root:
#
#     bash scripts/device_check.sh            # the CUDA tests, then decoupled and on-policy steps; one table
#
# What it needs on the GPU machine: torch with CUDA, transformers, accelerate, safetensors, pytest, numpy,
# pyyaml, rich, tqdm — all in the GPU image (torch 2.11, transformers 5.17). jackpot is used from the working
# tree through PYTHONPATH, not installed. Its other dependencies are not imported by this check (math-verify:
# text tasks only; TensorBoard: the check runs with tensorboard=false). If the probe below names a missing
# module, carry its wheel (pure Python, a few MiB, within the 64 MiB that travel with the working tree), prepared
# on a machine with the package index and put in ./wheels, which this script installs first, e.g.:
#
#     pip download --no-deps -d wheels "math-verify>=0.7" latex2sympy2_extended "antlr4-python3-runtime==4.13.2"
# Budget: ~1 min of CUDA tests, ~2-3 min per mode; each step
# bounded by `timeout`. Output: pytest's summary, then the table scripts/device_check.py prints — copy it into
# docs/PERFORMANCE.md ("The GPU check") with the date and the card.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G "wheels/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps --find-links wheels wheels/*.whl || echo "device_check: wheels not installed"
fi
python - <<'EOF' || exit 1
import jackpot.train.loop  # noqa: F401  (a missing dependency shows here, by name)
import torch
assert torch.cuda.is_available(), "device_check: no CUDA GPU visible"
free, total = torch.cuda.mem_get_info()
print(f"device_check: {torch.cuda.get_device_name()}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
echo "== CUDA tests (pytest -m cuda)"
timeout 180 python -m pytest -q -m cuda tests/cuda -p no:cacheprovider 2>&1 | tail -15
echo "== decoupled and on-policy steps, Qwen3-0.6B -> Qwen3-1.7B shapes (random weights)"
timeout "${DEVICE_CHECK_TIMEOUT:-330}" python scripts/device_check.py --steps "${DEVICE_CHECK_STEPS:-3}" \
    --new-tokens "${DEVICE_CHECK_NEW_TOKENS:-256}"
