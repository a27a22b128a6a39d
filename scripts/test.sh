#!/usr/bin/env bash
# The README's test command: every test, for real. Installs what the Nacos
# compatibility tests drive, under target/ (nacos-sdk-python from PyPI in a
# virtual environment, npm `nacos`; python3/node from Debian packages if
# missing), then runs `cargo test --workspace` (extra arguments are passed
# on). Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
need_debs=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need_debs+=(python3 python3-venv)
command -v node >/dev/null && command -v npm >/dev/null || need_debs+=(nodejs npm)
if [ ${#need_debs[@]} -gt 0 ]; then
  echo "== installing ${need_debs[*]} from Debian packages"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_debs[@]}" >/dev/null
fi

echo "== Nacos clients for the compatibility tests"
PYENV=target/nacos-python
if ! "$PYENV/bin/python" -c 'import nacos, v2.nacos' 2>/dev/null; then
  rm -rf "$PYENV"
  python3 -m venv "$PYENV"
  "$PYENV/bin/pip" install -q --disable-pip-version-check nacos-sdk-python==2.0.11
fi
NODEENV=target/nacos-node
if [ ! -d "$NODEENV/node_modules/nacos" ]; then
  mkdir -p "$NODEENV"
  npm install --prefix "$NODEENV" --no-audit --no-fund --silent nacos@2.6.3
fi
export ROSTER_NACOS_PYTHON="$PWD/$PYENV/bin/python"
export ROSTER_NACOS_NODE_MODULES="$PWD/$NODEENV/node_modules"

echo "== cargo test --workspace $*"
cargo test --workspace "$@"
