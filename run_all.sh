#!/usr/bin/env bash
# slimchat: the whole pipeline in one script.
#   bash run_all.sh          speedrun preset: one 8xH100 node, a few hours
#   bash run_all.sh tiny     the same stages, shrunk, on CPU against the offline mirror
#   bash run_all.sh test     install everything the tests need, then run pytest
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-speedrun}"

# ---------------------------------------------------------------------------
# environment: create or reuse .venv, install what requirements*.txt declare.
# A stamp of the requirement files' hash skips pip entirely when nothing changed.
setup_venv() {
    local reqs="$1"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    local stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename "$reqs")"
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -r "$reqs"
        touch "$stamp"
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
}

# The browser test drives Debian's Chromium; install it when we are root and it is missing.
install_browser() {
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
                || echo "warning: could not install chromium; the browser test will be skipped"
        fi
    fi
}

case "$preset" in
test)
    setup_venv requirements-test.txt
    install_browser
    python -m pytest -q "${@:2}"
    ;;
tiny)
    echo "run_all.sh tiny: not available yet (the stages are still being built)" >&2
    exit 2
    ;;
speedrun)
    echo "run_all.sh speedrun: not available yet (the stages are still being built)" >&2
    exit 2
    ;;
*)
    echo "unknown preset '$preset': use one of speedrun, tiny, test" >&2
    exit 2
    ;;
esac
