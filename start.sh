#!/usr/bin/env bash
# Start the reranker: UI and API on RERANKER_PORT (7860), metrics on RERANKER_METRICS_PORT (9091).
# `./start.sh --ray`: the same on Ray Serve instead (deploy/ray/serve.yaml, port 8000; docs/scale-out.md).
set -euo pipefail
# Paths in the settings are the caller's: make the relative ones absolute before moving to the project folder.
for name in RERANKER_MODEL RERANKER_INT8_CALIBRATION RERANKER_UI_AUTH; do
    value="${!name:-}"
    case "$name=$value" in
        RERANKER_UI_AUTH=./* | RERANKER_UI_AUTH=../*) ;;
        RERANKER_UI_AUTH=*:*) continue ;;  # user:password pairs, not a file (as Settings reads it)
    esac
    if [ -n "$value" ] && [ "${value#/}" = "$value" ] && [ -e "$value" ]; then
        export "$name=$PWD/$value"
    fi
done
if [ -n "${RERANKER_CACHE_DIR:-}" ] && [ "${RERANKER_CACHE_DIR#[/~]}" = "$RERANKER_CACHE_DIR" ]; then
    export RERANKER_CACHE_DIR="$PWD/$RERANKER_CACHE_DIR"
fi
cd "$(dirname "$0")"

: "${GRADIO_ANALYTICS_ENABLED:=False}"
: "${HF_HUB_DISABLE_TELEMETRY:=1}"
# The Rust tokenizer's own thread pool: one batched call per request tokenizes on every core.
: "${TOKENIZERS_PARALLELISM:=true}"
export GRADIO_ANALYTICS_ENABLED HF_HUB_DISABLE_TELEMETRY TOKENIZERS_PARALLELISM

# The service logs one JSON object per line; so do these few lines.
say() {
    local message="${1//\\/\\\\}"  # JSON-escaped: backslashes, quotes, tabs, line ends (a path may hold any)
    message="${message//\"/\\\"}"
    message="${message//$'\t'/\\t}"
    message="${message//$'\n'/\\n}"
    message="${message//$'\r'/\\r}"
    printf '{"level": "%s", "logger": "start.sh", "message": "%s", "timestamp": "%s"}\n' \
        "${2:-INFO}" "$message" "$(date -u +%Y-%m-%dT%H:%M:%S.%6N+00:00)"
}

if [ ! -x .venv/bin/python ]; then
    say "creating .venv and installing requirements.txt (first run only)"
    # Debian's and Ubuntu's own python3 leaves venv's pip bootstrap (ensurepip) to a package of its own.
    if ! python3 -m venv .venv >&2; then
        rm -rf .venv
        say "python3 -m venv failed: install Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" ERROR
        exit 1
    fi
fi
stamp=.venv/.installed-runtime
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
    touch "$stamp"
fi

if [ "${1:-}" = "--ray" ]; then
    stamp=.venv/.installed-ray
    if [ ! -f "$stamp" ] || [ requirements-ray.txt -nt "$stamp" ]; then
        say "installing requirements-ray.txt (first --ray run only)"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-ray.txt >&2
        touch "$stamp"
    fi
    : "${RAY_USAGE_STATS_ENABLED:=0}"
    export RAY_USAGE_STATS_ENABLED
    say "starting Ray Serve (deploy/ray/serve.yaml) at RERANKER_HOST:RERANKER_PORT where set, else 127.0.0.1:8000"
    # `serve run` on a one-node Ray kept to loopback (or the cluster at RAY_ADDRESS); SIGTERM stops it as Ctrl-C.
    exec .venv/bin/python -m deploy.ray
fi

say "loading ${RERANKER_MODEL:-BAAI/bge-reranker-v2-m3}; UI and API will be at http://${RERANKER_HOST:-127.0.0.1}:${RERANKER_PORT:-7860}/"
exec .venv/bin/python app.py
