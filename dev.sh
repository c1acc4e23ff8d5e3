#!/usr/bin/env bash
# Development entry point.
#   bash dev.sh demo   set up .venv, then chat with a small RWKV-7 model through transformers (--help: options)
#   bash dev.sh test   set up .venv, check the pins resolve from PyPI and every kernel compiles for sm_90, run the
#                      test suite (CPU) on the pinned transformers and on the newest release, then the loading,
#                      generation and tokenizer tests on the oldest and newest transformers 4.x it supports
set -euo pipefail
cd "$(dirname "$0")"

OLDER_TRANSFORMERS="4.57.6 4.48.3"
OLDER_TESTS="tests/test_model.py tests/test_generation.py tests/test_remote_code.py tests/test_tokenizer.py
             tests/test_chat_template.py"

setup() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
}

transformers_in() {  # the transformers version importable with PYTHONPATH=$1
    PYTHONPATH="$1" .venv/bin/python -c "import transformers; print(transformers.__version__)"
}

run_tests_with() {  # run pytest with the transformers installed in folder $1 ahead of .venv's
    local folder=$PWD/$1; shift
    local version; version=$(transformers_in "$folder")
    echo "--- transformers $version ($folder)"
    # conftest.py stops if the tests import another transformers than the one named here
    RWKV7_TEST_TRANSFORMERS=$version PYTHONPATH="$folder" .venv/bin/python -m pytest -q "$@"
}

install_pinned_transformers() {  # transformers $1 and what it needs, pinned in ci/, beside .venv (pip --target)
    local target=.cache/transformers-$1
    if [ ! -f "$target/.complete" ]; then
        rm -rf "$target"
        .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$target" \
            -r "ci/requirements-transformers-$1.txt"
        touch "$target/.complete"
    fi
}

install_newest_transformers() {  # the newest transformers release on PyPI today, with what it needs
    rm -rf .cache/transformers-newest
    .venv/bin/python -m pip install -q --disable-pip-version-check --target .cache/transformers-newest transformers
}

case "${1:-}" in
    demo)
        setup
        .venv/bin/python scripts/demo.py "${@:2}"
        ;;
    test)
        setup
        .venv/bin/python ci/check_pins.py
        mkdir -p .cache
        .venv/bin/python ci/compile_kernels.py > .cache/compile_kernels.log || { cat .cache/compile_kernels.log; exit 1; }
        tail -1 .cache/compile_kernels.log
        .venv/bin/python -m pytest -q "${@:2}"
        install_newest_transformers
        if [ "$(transformers_in "$PWD/.cache/transformers-newest")" = "$(transformers_in "")" ]; then
            echo "--- the newest transformers release is the pinned one, tested above"
        else
            run_tests_with .cache/transformers-newest "${@:2}"
        fi
        for version in $OLDER_TRANSFORMERS; do
            install_pinned_transformers "$version"
            # shellcheck disable=SC2086
            run_tests_with ".cache/transformers-$version" $OLDER_TESTS
        done
        ;;
    *)
        sed -n '2,6p' "$0"
        exit 2
        ;;
esac
