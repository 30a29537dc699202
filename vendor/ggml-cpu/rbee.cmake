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
