#!/usr/bin/env bash
# Writes vendor/ggml-cpu/upstream.patch: rbee's small-batch flash attention as a
# change to llama.cpp itself (what rbee.cmake does at build time, as source
# edits), for proposing upstream. `make upstream-patch` runs it.
#
#   vendor/ggml-cpu/upstream.sh [LLAMA_CPP_DIR]
#
# LLAMA_CPP_DIR is a llama.cpp tree: by default the one llama-cpp-sys-2 builds
# (cargo's registry copy). The patch, against that tree (`patch -p1` in it):
# - ggml/src/ggml-cpu/ops.cpp, ops.h: upstream's entry point becomes
#   ggml_compute_forward_flash_attn_ext_general (the kernel for every shape);
# - ggml/src/ggml-cpu/flash-attn-small.cpp (new): the entry point, taking the
#   small batches and handing every other shape to the general kernel;
# - ggml/src/ggml-cpu/CMakeLists.txt: the new file in the ggml-cpu library;
# - tests/test-backend-ops.cpp, where the tree has it (a git checkout; the
#   crate's copy does not): test-backend-ops-cases.cpp's cases at the end of
#   make_test_cases_eval().
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tree="${1:-}"
if [ -z "$tree" ]; then
    version="$(grep -A1 '^name = "llama-cpp-sys-2"' "$here/../../Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')"
    tree="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"llama-cpp-sys-2-$version"/llama.cpp 2>/dev/null | head -1)"
    [ -n "$tree" ] || { echo "error: llama-cpp-sys-2 $version is not in cargo's registry: run cargo build first, or pass a llama.cpp tree" >&2; exit 1; }
fi
[ -f "$tree/ggml/src/ggml-cpu/ops.cpp" ] || { echo "error: $tree is not a llama.cpp tree (no ggml/src/ggml-cpu/ops.cpp)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
files=(ggml/src/ggml-cpu/ops.cpp ggml/src/ggml-cpu/ops.h ggml/src/ggml-cpu/CMakeLists.txt)
[ -f "$tree/tests/test-backend-ops.cpp" ] && files+=(tests/test-backend-ops.cpp)
for f in "${files[@]}"; do
    mkdir -p "$work/a/$(dirname "$f")" "$work/b/$(dirname "$f")"
    cp "$tree/$f" "$work/a/$f"
    cp "$tree/$f" "$work/b/$f"
done

b="$work/b/ggml/src/ggml-cpu"
general=ggml_compute_forward_flash_attn_ext_general
grep -q '^void ggml_compute_forward_flash_attn_ext(' "$b/ops.cpp" \
    || { echo "error: ops.cpp no longer defines ggml_compute_forward_flash_attn_ext(" >&2; exit 1; }
sed -i "s/^void ggml_compute_forward_flash_attn_ext(/void $general(/" "$b/ops.cpp"
sed -i "s/^\(void ggml_compute_forward_flash_attn_ext(.*\)$/\1\nvoid $general(const struct ggml_compute_params * params, struct ggml_tensor * dst);/" "$b/ops.h"
sed -i 's|^\(\s*\)ggml-cpu/ops.cpp$|&\n\1ggml-cpu/flash-attn-small.cpp|' "$b/CMakeLists.txt"
grep -q flash-attn-small.cpp "$b/CMakeLists.txt" || { echo "error: no ggml-cpu/ops.cpp line in CMakeLists.txt" >&2; exit 1; }
sed -e "s/ggml_compute_forward_flash_attn_ext_upstream/$general/g" \
    -e 's/rbee_flash_attn_small_/ggml_cpu_flash_attn_small_/g' \
    -e 's|^// rbee: llama.cpp.s CPU flash attention for small batches (README.md here).|// CPU flash attention for small batches (2-63 query tokens over a long cache).|' \
    -e "s/renamed by rbee.cmake/$general in ops.cpp/" \
    -e 's/rbee.s tests read it/tests read it/; s/on unless rbee turns it off:/on unless turned off;/; s/RBEE_ATTN_KERNEL=upstream);/rbee sets it from RBEE_ATTN_KERNEL);/' \
    "$here/flash_attn_small.cpp" > "$work/flash-attn-small.cpp"
# The declaration of the general kernel comes from ops.h in the tree.
sed -i "/^extern \"C\" void $general(/,/dst);$/d" "$work/flash-attn-small.cpp"

t="$work/b/tests/test-backend-ops.cpp"
if [ -f "$t" ]; then
    python3 - "$t" "$here/test-backend-ops-cases.cpp" <<'PY'
import sys
path, cases = sys.argv[1], open(sys.argv[2]).read()
lines = open(path).read().split("\n")
start = next(i for i, l in enumerate(lines) if "make_test_cases_eval(" in l and l.rstrip().endswith("{"))
end = next(i for i in range(start, len(lines)) if lines[i].strip() == "return test_cases;")
lines[end:end] = cases.rstrip("\n").split("\n") + [""]
open(path, "w").write("\n".join(lines))
PY
fi

out="$here/upstream.patch"
{
    echo "rbee's small-batch CPU flash attention, as a change to llama.cpp"
    echo "(vendor/ggml-cpu/README.md in rbee; regenerate with make upstream-patch)."
    echo "Against: $(basename "$(dirname "$tree")")"
    echo
    cd "$work"
    diff -ruN a b || true
    mkdir -p empty
    diff -uN empty/flash-attn-small.cpp flash-attn-small.cpp \
        | sed -e '1s|^--- empty/flash-attn-small.cpp|--- /dev/null|' \
              -e '2s|^+++ flash-attn-small.cpp|+++ b/ggml/src/ggml-cpu/flash-attn-small.cpp|' || true
} | sed -E 's/^((---|\+\+\+) [^\t]*)\t.*$/\1/' > "$out"
echo "wrote $out ($(grep -c '^+' "$out") lines added; test-backend-ops cases: $([ -f "$t" ] && echo in the patch || echo "not in this tree: vendor/ggml-cpu/test-backend-ops-cases.cpp"))"
