# shellcheck shell=bash
# Sourced by scripts/report, scripts/demo and scripts/test (not run on its own).
#
# Makes sure the project's virtual environment exists at <repo>/.venv with torchfim installed
# editable and its dev extras (pytest, hypothesis, scikit-learn, matplotlib, mnist1d), torch pinned
# by constraints.txt (torch==2.13.0, the CPU build on this machine; every other package at the
# version the tests last passed with). The first use creates it;
# later uses only compare a stamp file and return at once. The install is redone when
# pyproject.toml, constraints.txt or this file change, or when an earlier install was interrupted.
#
# Sets TORCHFIM_ROOT (the repository root) and TORCHFIM_VENV (its .venv).
# Set PYTHON to choose the interpreter that creates the environment (default: python3).

TORCHFIM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCHFIM_VENV="$TORCHFIM_ROOT/.venv"

_torchfim_venv_ensure() {
    local root="$TORCHFIM_ROOT" venv="$TORCHFIM_VENV"
    local stamp="$venv/.torchfim-install-stamp"
    local want
    want="$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/scripts/_venv.sh" | cksum)" || return 1

    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0    # up to date: the fast path
    fi

    if [ ! -x "$venv/bin/python" ]; then
        echo "torchfim: creating $venv (first use; installs torch==2.13.0 CPU and the dev extras)..." >&2
        "${PYTHON:-python3}" -m venv "$venv" || {
            echo "torchfim: could not create $venv with ${PYTHON:-python3} -m venv" >&2
            return 1
        }
    else
        echo "torchfim: updating $venv (pyproject.toml or constraints.txt changed, or an earlier install did not finish)..." >&2
    fi

    rm -f "$stamp"
    # -q keeps pip quiet on success; its warnings and errors still show on stderr, less the
    # "Location 'file:///...' is ignored" lines that a pip configuration naming local package
    # folders that do not exist prints once per package.
    local log status=0
    log="$(mktemp)" || return 1
    (cd "$root" && "$venv/bin/python" -m pip install -q -c constraints.txt -e '.[dev]') 2>"$log" \
        || status=$?
    grep -v "^WARNING: Location 'file:.*' is ignored" "$log" >&2 || true
    rm -f "$log"
    if [ "$status" -ne 0 ]; then
        echo "torchfim: installing into $venv failed (see pip's message above); rerun to retry" >&2
        return 1
    fi
    # The peers (BackPACK, nngeometry, laplace-torch) pull torchvision from PyPI, a CUDA build whose
    # operators do not load next to the CPU torch ("operator torchvision::nms does not exist"); with it
    # installed, transformers fails on import in the examples. torchfim and its tests never use it:
    # where it does not import, it is removed.
    if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
        "$venv/bin/python" -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
    fi
    printf '%s\n' "$want" > "$stamp"
    echo "torchfim: $venv is ready" >&2
}

_torchfim_venv_ensure || return 1 2>/dev/null || exit 1
