//! Records which llama.cpp backends this binary carries, for `rbee --version`.

fn main() {
    let mut backends = vec!["cpu"];
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        backends.push("cuda");
    }
    if std::env::var_os("CARGO_FEATURE_METAL").is_some() {
        backends.push("metal");
    }
    println!("cargo:rustc-env=RBEE_BACKENDS={}", backends.join(","));
    println!("cargo:rerun-if-changed=build.rs");
}
