//! Records which llama.cpp backends this binary carries, for `rbee --version`,
//! and compiles rbee's C++ (the engine's exception boundary,
//! `src/worker/engine/guard.cpp`, and a lease's RPC server,
//! `src/rpc.cpp`) against the llama.cpp tree llama-cpp-sys-2 built.

use std::path::PathBuf;

fn main() {
    let mut backends = vec!["cpu"];
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        backends.push("cuda");
    }
    if std::env::var_os("CARGO_FEATURE_METAL").is_some() {
        backends.push("metal");
    }
    // llama.cpp's RPC backend (.cargo/config.toml sets GGML_RPC=ON for llama-cpp-sys-2).
    if std::env::var("GGML_RPC").is_ok_and(|v| v.eq_ignore_ascii_case("on")) {
        backends.push("rpc");
    }
    println!("cargo:rustc-env=RBEE_BACKENDS={}", backends.join(","));
    println!("cargo:rerun-if-env-changed=GGML_RPC");
    println!("cargo:rerun-if-changed=build.rs");
    cpp();
}

/// rbee's C++: the shim every throwing llama.cpp call goes through, and the
/// lease's RPC server. Its headers are llama.cpp's own (ggml's internal
/// backend header among them), from the source tree the CMake build of
/// llama-cpp-sys-2 names in its cache; its symbols resolve against that
/// build's libraries, which llama-cpp-sys-2 links (with the C++ runtime,
/// statically).
fn cpp() {
    let sources = ["src/worker/engine/guard.cpp", "src/rpc.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    let llama = llama_source().unwrap_or_else(|e| panic!("cannot find llama.cpp's sources: {e}"));
    cc::Build::new()
        .cpp(true)
        .files(sources)
        .include(llama.join("include"))
        .include(llama.join("ggml/include"))
        .include(llama.join("ggml/src"))
        .include(llama.join("common"))
        .include(llama.join("src"))
        .include(llama.join("vendor"))
        .flag_if_supported("-std=c++17")
        // llama-cpp-sys-2 links the C++ runtime already (statically: the
        // binary needs nothing beyond glibc); cc would add a shared one.
        .cpp_link_stdlib(None)
        .warnings(false)
        .compile("rbee_cpp");
}

/// llama.cpp's source directory, from the CMake cache of llama-cpp-sys-2's
/// build (`DEP_LLAMA_GGML_CMAKE_DIR` is `<its out dir>/lib/cmake`).
fn llama_source() -> Result<PathBuf, String> {
    let cmake_dir = std::env::var("DEP_LLAMA_GGML_CMAKE_DIR")
        .map_err(|_| "llama-cpp-sys-2 did not say where it built llama.cpp".to_string())?;
    let out = PathBuf::from(cmake_dir);
    let cache = out
        .ancestors()
        .nth(2)
        .map(|o| o.join("build/CMakeCache.txt"))
        .ok_or("no out dir above DEP_LLAMA_GGML_CMAKE_DIR")?;
    let text = std::fs::read_to_string(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("CMAKE_HOME_DIRECTORY:INTERNAL="))
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} names no source directory", cache.display()))
}
