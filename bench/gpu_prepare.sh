#!/usr/bin/env bash
# Stage what a GPU host without network needs to run `pytest -m gpu` and bench/gpu.py (bench/gpu_run.sh):
# the wheels its Python lacks and a float16 copy of the MiniLM weights, in .gpu/ (git-ignored, < 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf .gpu && mkdir -p .gpu/whl
# Versions as requirements.txt pins them; the host has torch, numpy, scipy, tokenizers, prometheus-client.
wanted=()
for name in sentence-transformers transformers python-json-logger opentelemetry-api opentelemetry-sdk; do
    wanted+=("$(grep -i "^${name}==" requirements.txt)")
done
wanted+=("opentelemetry-semantic-conventions==$(.venv/bin/python -c \
    'from importlib.metadata import version; print(version("opentelemetry-semantic-conventions"))')")
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "${wanted[@]}"
.venv/bin/python -c 'import sys; from pathlib import Path; from bench.workload import export_minilm
export_minilm(Path(sys.argv[1]))' .gpu/minilm
du -sh .gpu
