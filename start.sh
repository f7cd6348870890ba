#!/usr/bin/env bash
# Start the reranker: UI and API on RERANKER_PORT (7860), metrics on RERANKER_METRICS_PORT (9091).
set -euo pipefail
cd "$(dirname "$0")"

: "${GRADIO_ANALYTICS_ENABLED:=False}"
: "${HF_HUB_DISABLE_TELEMETRY:=1}"
# The Rust tokenizer's own thread pool: one batched call per request tokenizes on every core.
: "${TOKENIZERS_PARALLELISM:=true}"
export GRADIO_ANALYTICS_ENABLED HF_HUB_DISABLE_TELEMETRY TOKENIZERS_PARALLELISM

# The service logs one JSON object per line; so do these few lines.
say() {
    printf '{"level": "INFO", "logger": "start.sh", "message": "%s", "timestamp": "%s"}\n' \
        "$1" "$(date -u +%Y-%m-%dT%H:%M:%S.%6N+00:00)"
}

if [ ! -x .venv/bin/python ]; then
    say "creating .venv and installing requirements.txt (first run only)"
    python3 -m venv .venv
fi
stamp=.venv/.installed-runtime
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
    touch "$stamp"
fi

say "loading ${RERANKER_MODEL:-BAAI/bge-reranker-v2-m3}; UI and API will be at http://${RERANKER_HOST:-127.0.0.1}:${RERANKER_PORT:-7860}/"
exec .venv/bin/python app.py
