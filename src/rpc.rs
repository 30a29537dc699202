//! llama.cpp's RPC backend (DESIGN.md §12): the server a lending hive runs in
//! a child process (`rbee rpc-server`), and the remote devices a split worker
//! adds before it loads its model. llama-cpp-sys-2's bindings leave out
//! `ggml-rpc.h`, so the client's entry point is declared here; the server's
//! is `rpc.cpp`'s, which holds it to a lease's budget.

use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;

// As declared in llama.cpp/ggml/include/ggml-rpc.h of llama-cpp-sys-2 0.1.161
// (RPC protocol 7.0.0):
//   GGML_BACKEND_API ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
// It is in libggml-rpc.a, which the build links with GGML_RPC=ON
// (.cargo/config.toml). The server side is `rpc.cpp`: llama.cpp's server
// around a device of the lease's own.
extern "C" {
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
    fn rbee_rpc_serve(
        endpoint: *const c_char,
        cache_dir: *const c_char,
        n_threads: usize,
        budget_bytes: u64,
    ) -> i32;
}

// C's stdout, which llama.cpp's RPC server prints to.
#[cfg(target_os = "linux")]
extern "C" {
    #[link_name = "stdout"]
    static mut C_STDOUT: *mut libc::FILE;
}
#[cfg(target_os = "macos")]
extern "C" {
    #[link_name = "__stdoutp"]
    static mut C_STDOUT: *mut libc::FILE;
}

/// Line-buffers C's stdout, so the server's lines reach its hive's log as
/// they are printed rather than when a buffer fills.
fn line_buffered_stdout() {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    // SAFETY: called once, before the server prints anything.
    unsafe {
        libc::setvbuf(C_STDOUT, std::ptr::null_mut(), libc::_IOLBF, 0);
    }
}

fn c_string(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} holds a NUL byte"))
}

fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml hands out NUL-terminated names that live as long as the device.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Serves this machine's CPU on `endpoint` (`127.0.0.1:PORT`) to one RPC
/// client at a time, as a device whose memory is `budget_bytes` (`rpc.cpp`),
/// caching received tensors in `cache_dir`. Returns only if the server could
/// not start (llama.cpp has said why on stderr).
pub fn serve(
    endpoint: &str,
    cache_dir: &Path,
    threads: usize,
    budget_bytes: u64,
) -> Result<(), String> {
    let endpoint_c = c_string("endpoint", endpoint)?;
    let cache_c = c_string("cache directory", &cache_dir.to_string_lossy())?;
    line_buffered_stdout();
    // SAFETY: the strings outlive the call, which only returns on failure.
    unsafe {
        rbee_rpc_serve(endpoint_c.as_ptr(), cache_c.as_ptr(), threads, budget_bytes);
    }
    Err(format!("llama.cpp's RPC server on {endpoint} stopped"))
}

/// Adds the RPC server at `endpoint` (`host:port`) as a device; its index in
/// ggml's device list, for [`llama_cpp_2::model::params::LlamaModelParams::with_devices`].
pub fn add_remote(endpoint: &str) -> Result<usize, String> {
    let endpoint_c = c_string("endpoint", endpoint)?;
    // SAFETY: a valid C string; the registry that comes back lives for the process.
    let reg = unsafe { ggml_backend_rpc_add_server(endpoint_c.as_ptr()) };
    if reg.is_null() {
        return Err(format!(
            "the RPC server behind {endpoint} lends no device (it did not answer)"
        ));
    }
    unsafe { sys::ggml_backend_register(reg) };
    let count = unsafe { sys::ggml_backend_dev_count() };
    (0..count)
        .find(|&i| {
            let dev = unsafe { sys::ggml_backend_dev_get(i) };
            text(unsafe { sys::ggml_backend_dev_description(dev) }) == endpoint
        })
        .ok_or_else(|| format!("the RPC device for {endpoint} is not in ggml's device list"))
}

/// The shares of the offloaded layers, per device in order, that give each
/// remote its planned layers and the last one the output layer too: llama.cpp
/// counts the output layer among `n_gpu_layers` and gives it to the last device.
pub fn tensor_split(layers: &[u32]) -> (u32, Vec<f32>) {
    let mut split: Vec<f32> = layers.iter().map(|&l| l as f32).collect();
    if let Some(last) = split.last_mut() {
        *last += 1.0;
    }
    let lent = layers.iter().fold(0u32, |n, l| n.saturating_add(*l));
    let offloaded = lent.saturating_add(u32::from(!layers.is_empty()));
    (offloaded, split)
}

/// Which device llama.cpp gives each of `n_layer` layers (and the output
/// layer, last), as `llama_model::load_tensors` computes it: `None` is the
/// CPU. What the planned split is checked against.
pub fn layer_devices(n_layer: u32, n_gpu_layers: u32, split: &[f32]) -> Vec<Option<usize>> {
    let sum: f32 = split.iter().sum();
    let mut acc = 0.0f32;
    let points: Vec<f32> = split
        .iter()
        .map(|s| {
            acc += s;
            acc / sum
        })
        .collect();
    let start = (n_layer + 1).saturating_sub(n_gpu_layers);
    let active = n_gpu_layers.min(n_layer + 1);
    (0..=n_layer)
        .map(|il| {
            if il < start || il - start >= active || split.is_empty() {
                return None;
            }
            let x = (il - start) as f32 / active as f32;
            Some(points.partition_point(|&p| p <= x))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_remote_gets_its_planned_layers_and_the_last_the_output() {
        for plan in [
            vec![15],
            vec![10, 7],
            vec![1, 1, 1],
            vec![12, 0, 9],
            vec![30],
        ] {
            let n_layer = 30;
            let (offloaded, split) = tensor_split(&plan);
            let devices = layer_devices(n_layer, offloaded, &split);
            let local = n_layer - plan.iter().sum::<u32>();
            assert!(
                devices[..local as usize].iter().all(Option::is_none),
                "{plan:?}"
            );
            for (d, &layers) in plan.iter().enumerate() {
                let got = devices[..n_layer as usize]
                    .iter()
                    .filter(|x| **x == Some(d))
                    .count();
                assert_eq!(got, layers as usize, "{plan:?} device {d}");
            }
            assert_eq!(devices[n_layer as usize], Some(plan.len() - 1), "{plan:?}");
        }
        assert_eq!(tensor_split(&[]), (0, vec![]));
    }
}
