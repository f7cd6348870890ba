#!/usr/bin/env bash
# Start the reranker: UI and API on RERANKER_PORT (7860), metrics on RERANKER_METRICS_PORT (9091).
set -euo pipefail
cd "$(dirname "$0")"

: "${GRADIO_ANALYTICS_ENABLED:=False}"
: "${HF_HUB_DISABLE_TELEMETRY:=1}"
: "${TOKENIZERS_PARALLELISM:=false}"
export GRADIO_ANALYTICS_ENABLED HF_HUB_DISABLE_TELEMETRY TOKENIZERS_PARALLELISM

if [ ! -x .venv/bin/python ]; then
    echo "creating .venv and installing requirements.txt (first run only)..." >&2
    python3 -m venv .venv
fi
stamp=.venv/.installed-runtime
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip >&2
    .venv/bin/python -m pip install --quiet -r requirements.txt >&2
    touch "$stamp"
fi

echo "reranker: loading ${RERANKER_MODEL:-BAAI/bge-reranker-v2-m3}; UI and API at http://${RERANKER_HOST:-127.0.0.1}:${RERANKER_PORT:-7860}/" >&2
exec .venv/bin/python app.py
