# rbee: gives llama.cpp's CPU backend the small-batch flash attention of
# flash_attn_small.cpp beside this file (README.md here says why).
#
# llama-cpp-sys-2 passes CMAKE_* variables from the environment to llama.cpp's
# CMake, and .cargo/config.toml sets CMAKE_PROJECT_ggml_INCLUDE to this file, so
# it runs right after ggml's project(). When the ggml directory is done (its
# targets defined), upstream's entry point in ops.cpp is renamed
# ggml_compute_forward_flash_attn_ext_upstream and flash_attn_small.cpp, which
# defines the entry point and hands it every shape it does not take, joins the
# ggml-cpu library. The llama.cpp sources themselves are not touched.

set(RBEE_GGML_CPU_DIR "${CMAKE_CURRENT_LIST_DIR}")

# What the kernel relies on, as reviewed against llama-cpp-sys-2 0.1.161: the op
# and upstream's kernel (ops.cpp, ops.h), the planner that sizes the scratch and
# the dispatch that calls the entry point (ggml-cpu.c), the compute params
# (ggml-cpu-impl.h), the tile sizes (common.h) and the GEMM (simd-gemm.h). A
# llama.cpp whose files differ stops the build here: the kernel must be
# re-reviewed against it (README.md here, "Upgrading llama.cpp"), then these pins
# updated.
set(RBEE_GGML_CPU_PINS
    "ops.cpp=215d16e7ebbb4066920e2d7a5f7ea6c46636d298aedd553e00f0b3ebb0d59305"
    "ops.h=2727d0414c23f1d06ade33d277c3ca1f0726c7902642c0e36d839c20781b1694"
    "ggml-cpu.c=45b22f8c83b2cbccabfc2f81a38ef8a5810223e1ce366b7c6f77d42faa5cc6f3"
    "ggml-cpu-impl.h=785a19aac84bd35671d34b1986b920baadccdf61cd8b81e787028f6ac24cae60"
    "common.h=db7c19747a28c819d18922aa43b91b224df3730e424e6d8a4cf4fd16bfb1db14"
    "simd-gemm.h=e82a07445059ec4a4c7d8dd75a2663d459025274d817be3f83c1f5989a79208d")

function(rbee_ggml_cpu_flash_attn)
    set(ops "${ggml_SOURCE_DIR}/src/ggml-cpu/ops.cpp")
    if (NOT TARGET ggml-cpu OR NOT EXISTS "${ops}")
        message(FATAL_ERROR "rbee: llama.cpp has no ggml-cpu target or ${ops}: "
                            "vendor/ggml-cpu/README.md says what this hook expects")
    endif()
    file(STRINGS "${ops}" entry REGEX "^void ggml_compute_forward_flash_attn_ext\\(")
    if (NOT entry)
        message(FATAL_ERROR "rbee: ${ops} no longer defines ggml_compute_forward_flash_attn_ext: "
                            "vendor/ggml-cpu/README.md says what this hook expects")
    endif()
    foreach(pin IN LISTS RBEE_GGML_CPU_PINS)
        string(REPLACE "=" ";" pin "${pin}")
        list(GET pin 0 name)
        list(GET pin 1 pinned)
        set(file "${ggml_SOURCE_DIR}/src/ggml-cpu/${name}")
        if (NOT EXISTS "${file}")
            message(FATAL_ERROR "rbee: the attention kernel must be re-reviewed against this "
                                "llama.cpp: ${file} is gone (vendor/ggml-cpu/README.md)")
        endif()
        file(SHA256 "${file}" found)
        if (NOT found STREQUAL pinned)
            message(FATAL_ERROR "rbee: the attention kernel must be re-reviewed against this "
                                "llama.cpp: ${name} is not the one it was written for "
                                "(sha256 ${found}, pinned ${pinned}; vendor/ggml-cpu/README.md)")
        endif()
    endforeach()
    set_property(SOURCE "${ops}" TARGET_DIRECTORY ggml-cpu APPEND PROPERTY COMPILE_DEFINITIONS
                 "ggml_compute_forward_flash_attn_ext=ggml_compute_forward_flash_attn_ext_upstream")
    target_sources(ggml-cpu PRIVATE "${RBEE_GGML_CPU_DIR}/flash_attn_small.cpp")
    message(STATUS "rbee: ggml-cpu takes small-batch flash attention from ${RBEE_GGML_CPU_DIR}")
endfunction()

if (CMAKE_VERSION VERSION_LESS 3.19)
    message(WARNING "rbee: CMake ${CMAKE_VERSION} cannot defer a call (3.19+): "
                    "llama.cpp keeps its own small-batch flash attention")
else()
    cmake_language(DEFER CALL rbee_ggml_cpu_flash_attn)
endif()
