#!/usr/bin/env bash
# Creates ./.venv from a Python >= 3.12 and installs survjax into it, with the package
# versions of constraints.txt (those of the committed results and CI; SURVJAX_CONSTRAINTS=
# empty for pyproject's ranges alone, e.g. where a pinned wheel does not exist).
#   bash scripts/bootstrap.sh            # the package
#   bash scripts/bootstrap.sh test       # + test extras (any extras, comma-separated)
# Python: $SURVJAX_PYTHON if set, else python3.13/python3.12/python3 on PATH if >= 3.12,
# else an interpreter installed under pyenv (whose python3.12 shim fails unless
# PYENV_VERSION is set) or in /usr/local/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${SURVJAX_VENV:-.venv}"

ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c p
  for c in "${SURVJAX_PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$c" ] || continue
    p=$(command -v "$c" 2>/dev/null) || continue
    ok "$p" && { echo "$p"; return 0; }
  done
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin/python3 \
           /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$p" ] && ok "$p" && { echo "$p"; return 0; }
  done
  return 1
}

if [ ! -x "$venv/bin/python" ] || ! ok "$venv/bin/python"; then
  if ! py=$(find_python); then
    echo "survjax needs Python >= 3.12 (JAX and Flax 0.12 require it; on 3.11 pip silently" >&2
    echo "installs an old JAX). Install one, e.g. 'pyenv install 3.12' or your OS package" >&2
    echo "python3.12 + python3.12-venv, or point SURVJAX_PYTHON at it." >&2
    exit 1
  fi
  echo "survjax: creating $venv with $py ($("$py" --version 2>&1))"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
constraints="${SURVJAX_CONSTRAINTS-constraints.txt}"
"$venv/bin/python" -m pip install -q ${constraints:+-c "$constraints"} -e "$spec"
echo "survjax: installed into $venv ($("$venv/bin/python" --version 2>&1), extras: ${extras:-none}, versions: ${constraints:-unpinned})"
