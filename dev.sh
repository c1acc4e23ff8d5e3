#!/usr/bin/env bash
# Development entry point.
#   bash dev.sh demo   set up .venv, build a small random RWKV-7 model and chat with it through transformers
#   bash dev.sh test   set up .venv and run the test suite (CPU), then the model, generation and tokenizer tests
#                      again on the oldest and newest transformers 4.x this package supports
set -euo pipefail
cd "$(dirname "$0")"

OLDER_TRANSFORMERS="4.57.6 4.48.3"

setup() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
}

with_transformers() {  # run a command with another transformers installed beside .venv (pip --target)
    local version=$1; shift
    local target=.cache/transformers-$version
    if [ ! -f "$target/.complete" ]; then
        rm -rf "$target"
        .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$target" \
            -r "ci/requirements-transformers-$version.txt"
        touch "$target/.complete"
    fi
    PYTHONPATH="$target" "$@"
}

case "${1:-}" in
    demo)
        setup
        .venv/bin/python scripts/demo.py "${@:2}"
        ;;
    test)
        setup
        .venv/bin/python -m pytest -q "${@:2}"
        for version in $OLDER_TRANSFORMERS; do
            echo "--- transformers $version"
            with_transformers "$version" .venv/bin/python -m pytest -q tests/test_model.py tests/test_generation.py \
                tests/test_remote_code.py tests/test_tokenizer.py tests/test_chat_template.py
        done
        ;;
    *)
        sed -n '2,5p' "$0"
        exit 2
        ;;
esac
