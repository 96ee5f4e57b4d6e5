#!/bin/bash
# llama.cpp for `hpclora export` (GGUF) and for chat/generate on a GGUF, into the environment of PYTHON: its library
# (llama-cpp-python, compiled here with cmake and the C++ compiler: about 4 minutes on 2 cores; the multimodal library
# is left out) and its converters, from the same source distribution, into <prefix>/share/llama.cpp (where
# results/llamacpp.py finds them), so that both are one llama.cpp. VERSION there records SPEC.
#   containers/install-llama-cpp.sh PYTHON SPEC       e.g. .venv/bin/python llama-cpp-python==0.3.36
# CMAKE_ARGS adds to the build's options: images set -DGGML_NATIVE=OFF, so that the library runs on every node's CPU,
# not only on the one that built it.
set -euo pipefail
python=$1 spec=$2
options="-DLLAVA_BUILD=OFF"
# A native build on a CPU with AMX (Sapphire Rapids and later) compiles ggml's AMX kernels, which crash in the first
# matrix product of every quantized model there (llama.cpp issue 20824); the AVX-512 kernels serve those CPUs.
[ "$(uname -m)" = x86_64 ] && options+=" -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
share=$("$python" -c 'import sys; print(sys.prefix)')/share/llama.cpp
rm -rf "$share" "$share.sdist"
mkdir -p "$share.sdist"
# Only llama-cpp-python from source: its build tools (cmake, ninja, scikit-build-core) as wheels, not compiled too.
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$share.sdist" "$spec"
CMAKE_ARGS="$options ${CMAKE_ARGS:-}" "$python" -m pip install --quiet "$share.sdist"/*.tar.gz "sentencepiece>=0.2"
mkdir -p "$share"
tar -xzf "$share.sdist"/*.tar.gz -C "$share" --strip-components=3 --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
    '*/vendor/llama.cpp/conversion' '*/vendor/llama.cpp/gguf-py' '*/vendor/llama.cpp/LICENSE'
rm -rf "$share.sdist"
echo "$spec" > "$share/VERSION"
