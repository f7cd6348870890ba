#!/usr/bin/env bash
# Stage what a GPU host without network needs (bench/gpu_run.sh runs it there), in .gpu/ (git-ignored; a device
# call carries at most 64 MiB):
#   bench/gpu_prepare.sh         the engine: wheels the host lacks and a float16 copy of the MiniLM weights, for
#                                `pytest -m gpu` and bench/gpu.py (58 MiB)
#   bench/gpu_prepare.sh serve   Ray Serve too (bench/gpu_serve.py, and bench/gpu.py's random-weight models): the
#                                same wheels plus ray[serve] and everything it and the ingress import, unpacked,
#                                stripped and packed in one .gpu/site.tar.xz (Ray's wheel alone is 76 MB: its Java
#                                jar and the dashboard's web client go, unused here; ~42 MiB), without MiniLM
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-engine}"
[ "$mode" = engine ] || [ "$mode" = serve ] || { echo "usage: $0 [serve]" >&2; exit 2; }
# Versions as this checkout's venv has them (requirements*.txt pin them); the host has torch, numpy, scipy,
# tokenizers, huggingface-hub, safetensors, prometheus-client and nvidia-ml-py.
names=(sentence-transformers transformers python-json-logger opentelemetry-api opentelemetry-sdk
       opentelemetry-semantic-conventions)
if [ "$mode" = serve ]; then
    # requirements-ray.txt but for what only runtime environments and the dashboard use (virtualenv, py-spy),
    # and what the ingress imports from requirements.txt's tree (FastAPI, uvicorn, OpenTelemetry's instrumentation).
    # shellcheck disable=SC2207  # names without spaces
    names+=($(grep -vE '^(#|virtualenv|py-spy|distlib|python-discovery)' requirements-ray.txt | sed -E 's/(\[|==).*//'))
    names+=(fastapi starlette uvicorn pydantic pydantic_core annotated-types annotated-doc typing-inspection
            typing_extensions anyio sniffio h11 idna click filelock protobuf grpcio googleapis-common-protos
            opentelemetry-proto opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc
            opentelemetry-exporter-otlp-proto-http opentelemetry-instrumentation opentelemetry-instrumentation-asgi
            opentelemetry-instrumentation-fastapi opentelemetry-util-http asgiref wrapt orjson python-multipart
            fastapi-swagger brotli colorama pyyaml httpx httpcore requests urllib3 certifi charset-normalizer packaging psutil
            platformdirs rsa cachetools)
fi
wanted=$(.venv/bin/python - "${names[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in dict.fromkeys(sys.argv[1:]):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass  # not in this venv's tree: not needed
PY
)
rm -rf .gpu && mkdir -p .gpu/whl
# shellcheck disable=SC2086  # one requirement per word
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl $wanted
if [ "$mode" = engine ]; then
    .venv/bin/python -c 'import sys; from pathlib import Path; from bench.workload import export_minilm
export_minilm(Path(sys.argv[1]))' .gpu/minilm
else
    site=$(mktemp -d)
    python3 -m pip install --quiet --no-deps --no-compile --target "$site" --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --only-binary=:all: .gpu/whl/*.whl
    rm -rf "$site/ray/jars" "$site/ray/dashboard/client/build" .gpu/whl
    find "$site" -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded {} +
    strip --strip-unneeded "$site/ray/core/src/ray/gcs/gcs_server" "$site/ray/core/src/ray/raylet/raylet"
    tar cf - -C "$site" . | xz -8 -T0 > .gpu/site.tar.xz
    rm -rf "$site"
fi
du -sh .gpu
