#!/usr/bin/env bash
# On a GPU host prepared by bench/gpu_prepare.sh (the .gpu folder next to the checkout): install the carried
# wheels outside the system site, then run the GPU tests and the GPU benchmark (with a profile of the first
# variant), logging each to $OUT or ./gpu-logs.
#   bench/gpu_run.sh [tests] [bge] [qwen3] [fidelity] [host] [serve]   (default: the first five; bench options via
#   BENCH_ARGS; serve, Ray Serve on the GPU, needs bench/gpu_prepare.sh serve, which leaves out what tests and
#   fidelity need)
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-gpu-logs}"
mkdir -p "$out"
if [ -f .gpu/site.tar.xz ]; then  # bench/gpu_prepare.sh serve: packed, unpacked here
    rm -rf /tmp/gpu-site && mkdir -p /tmp/gpu-site && tar xJf .gpu/site.tar.xz -C /tmp/gpu-site || exit 1
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
        .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/gpu-site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 RERANKER_BENCH_MINILM_DIR="$PWD/.gpu/minilm"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests bge qwen3 fidelity host)
status=0
for part in "${parts[@]}"; do
    if [ "$part" = tests ]; then
        python3 -m pytest -m gpu -v -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
    elif [ "$part" = serve ]; then
        # Ray Serve's GPU config (rayservice.yaml) beside the engine alone, on a local loopback Ray.
        python3 -m bench.gpu_serve 2>&1 | tee "$out/bench-gpu-serve.log"
    elif [ "$part" = host ]; then
        # The engine's host path with the network's pass replaced by zero logits: the most tokens/s it can feed.
        python3 -m bench.host_path --device cuda --batch-tokens 32768 2>&1 | tee "$out/bench-host-path.log"
    else
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
        # --profile: a table and a Chrome trace of 4 RAG requests with the first variant, per model shape.
        python3 -m bench.gpu --only "$part" --profile "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench-gpu-$part.log"
    fi
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
# A device call returns at most 8 files: the profiles (a table and a trace per model shape) travel as one.
profiles=("$out"/profile-* "$out"/trace-*)
if [ -e "${profiles[0]}" ]; then
    tar czf "$out/profiles.tgz" -C "$out" "${profiles[@]##*/}" && rm -f "${profiles[@]}"
fi
exit $status
