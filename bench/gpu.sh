#!/usr/bin/env bash
# rbee against llama-server on one NVIDIA GPU, every layer offloaded, side by side in
# one run: SmolLM2 and the Llama-3.2-1B shape (a chat turn's TTFT and decode against
# the conversation's depth, aggregate tokens/s against streams) and the Llama-3.1-8B
# shape at one stream (bench/curves.py --gpu). Sized for a 16-core machine with a
# datacenter GPU: about 12 minutes, builds included.
#
#   bench/gpu.sh          on the GPU machine: CUDA builds of both, then the curves
#   bench/gpu.sh --cpu    the same steps without CUDA, on fewer and shallower points:
#                         checks the script on any machine (the CPU's figures are
#                         `make bench`'s)
#
# Needs what `make build` and `make bench` need (cargo and crates.io or a vendored
# registry, cmake, clang; python3 with numpy and gguf, which `make bench` puts in
# .models/py) and, for CUDA, nvcc and nvidia-smi. Writes bench/results/gpu-*.json and
# .log, and the charts as docs/curves/gpu-*.png.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=cuda
if [ "${1:-}" = "--cpu" ]; then mode=cpu; fi
stamp="$(date +%Y%m%d-%H%M%S)"
results=bench/results
if [ "$mode" = cpu ]; then results="$(mktemp -d /tmp/rbee-gpu-check-XXXXXX)"; fi
mkdir -p "$results"
log="$results/gpu-$stamp.log"
say() { echo "[gpu.sh $(date +%T)] $*" | tee -a "$log" >&2; }

if [ "$mode" = cuda ]; then
    for tool in nvidia-smi nvcc cmake cargo; do
        command -v "$tool" >/dev/null || { echo "bench/gpu.sh: no $tool here (bench/gpu.sh --cpu checks the script without a GPU)" >&2; exit 2; }
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee -a "$log"
    arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')"
    # llama-cpp-sys-2 passes CMAKE_* variables to llama.cpp's CMake: build for this GPU alone.
    export CMAKE_CUDA_ARCHITECTURES="$arch"
    features=(--features cuda)
    target_dir=target/cuda
    llama_build=.models/llama.cpp/build-cuda
    llama_flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch")
    curves=(--gpu)
else
    for tool in cmake cargo; do
        command -v "$tool" >/dev/null || { echo "bench/gpu.sh: no $tool here" >&2; exit 2; }
    done
    features=()
    target_dir=target
    llama_build=.models/llama.cpp/build
    llama_flags=()
    # Shallow and few, kept out of bench/results and the README's charts: the steps
    # are checked, not measured.
    curves=(--depths 256,512 --streams 1,2 --tokens 16 --models smollm2 --single "" --no-docs)
fi
say "mode $mode, $(nproc) cores"

say "building rbee ${features[*]:-(CPU)}"
CARGO_TARGET_DIR="$target_dir" cargo build --release --quiet --bin rbee "${features[@]}"
rbee="$target_dir/release/rbee"
if [ "$mode" = cuda ] && ! "$rbee" worker --help 2>&1 | grep -q "default: all when built with a GPU"; then
    say "warning: $rbee does not say it offloads by default"
fi

# llama-server from the llama.cpp that `make bench` unpacks (the version rbee's crate builds).
make --no-print-directory model .models/llama.cpp/CMakeLists.txt .models/py/matplotlib/__init__.py >/dev/null
if [ ! -x "$llama_build/bin/llama-server" ]; then
    say "building llama-server in $llama_build ${llama_flags[*]:-}"
    cmake -S .models/llama.cpp -B "$llama_build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
        "${llama_flags[@]}" >/dev/null
    cmake --build "$llama_build" -j"$(nproc)" --target llama-server >/dev/null
fi
"$llama_build/bin/llama-server" --version 2>&1 | grep -m1 version | tee -a "$log" || true

say "measuring (bench/curves.py ${curves[*]})"
PYTHONPATH=.models/py python3 bench/curves.py --rbee "$rbee" --llama-server "$llama_build/bin/llama-server" \
    --out "$results" "${curves[@]}" 2>&1 | tee -a "$log"
newest="$(ls -t "$results"/curves-*.json | head -1)"
mv "$newest" "$results/gpu-$stamp.json"
say "figures: $results/gpu-$stamp.json (log $log)"
