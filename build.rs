//! Records which llama.cpp backends this binary carries, for `rbee --version`.

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
}
