#!/usr/bin/env bash
# The whole test run from a fresh clone: creates .venv, installs what it needs, lints, type-checks, tests.
set -euo pipefail
cd "$(dirname "$0")"

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

# Debian packages the tests drive: headless Chromium (UI tests) and Prometheus/promtool.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
# Debian's and Ubuntu's own python3 leaves venv's pip bootstrap to a package of its own.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.installed-dev
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] \
        || [ requirements-docs.txt -nt "$stamp" ] || [ requirements-ray.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt
    # Ray Serve, for deploy/ray and tests/test_ray_*.py (./start.sh --ray installs the same).
    .venv/bin/python -m pip install --quiet -r requirements-ray.txt
    touch "$stamp" .venv/.installed-runtime .venv/.installed-ray
fi
# LangChain's and LlamaIndex's Cohere rerankers, which pin an older cohere SDK: their own venv, for
# tests/test_clients.py.
if [ ! -x .venv-integrations/bin/python ]; then
    python3 -m venv .venv-integrations
fi
stamp=.venv-integrations/.installed
if [ ! -f "$stamp" ] || [ requirements-integrations.txt -nt "$stamp" ]; then
    .venv-integrations/bin/python -m pip install --quiet -r requirements-integrations.txt
    touch "$stamp"
fi

.venv/bin/ruff check .
.venv/bin/mypy
# The documentation site: a page missing from the nav or a broken link or anchor fails the build (mkdocs.yml's
# validation). Not --quiet: mkdocs 1.6.1 then stops counting warnings, and --strict passes anything.
docs_site=$(mktemp -d)
trap 'rm -rf "$docs_site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$docs_site"
.venv/bin/python -m pytest "$@"
