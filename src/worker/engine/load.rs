//! Loading the model: the file checked, its layers loaded with progress
//! (a layer at a time to subscribers), a split model's remote devices added.

use super::Config;
use crate::protocol::LoadingEvent;
use crate::rpc;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Checks the file, reads its layer count from the header, then loads it with progress.
pub(super) fn load_model(
    config: &Config,
    layers_total: u32,
    progress: &watch::Sender<LoadingEvent>,
    stopping: &Arc<AtomicBool>,
) -> Result<(LlamaBackend, LlamaModel), String> {
    let path = &config.model_path;
    crate::gguf::read(path)?;
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let backend = LlamaBackend::init().map_err(|e| format!("cannot start llama.cpp: {e}"))?;
    let report = progress.clone();
    let event_config = config.clone();
    let stop = stopping.clone();
    let mut last = None;
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(config.gpu_layers)
        .with_main_gpu(config.main_gpu);
    let params = with_remotes(params, &config.remotes, layers_total)?.with_progress_callback(
        move |fraction: f32| {
            let event = progress_event(&event_config, layers_total, fraction, size);
            // The callback fires per tensor; tell subscribers once per layer.
            if last.as_ref() != Some(&event) {
                last = Some(event.clone());
                report.send_replace(event);
            }
            !stop.load(Ordering::Relaxed)
        },
    );
    let started = Instant::now();
    let model = LlamaModel::load_from_file(&backend, path, &params).map_err(|e| {
        if stopping.load(Ordering::Relaxed) {
            "loading aborted: the worker is shutting down".to_string()
        } else {
            format!("llama.cpp could not load {}: {e}", path.display())
        }
    })?;
    tracing::info!(
        "loaded {} ({} layers, {} MB) in {:.1}s",
        path.display(),
        model.n_layer(),
        size / 1_048_576,
        started.elapsed().as_secs_f32()
    );
    Ok((backend, model))
}

/// A split model: the lending hives' RPC devices take the last layers, each
/// its planned share (the last one the output layer too); the rest stay on
/// this machine's CPU.
fn with_remotes(
    params: LlamaModelParams,
    remotes: &[(String, u32)],
    layers_total: u32,
) -> Result<LlamaModelParams, String> {
    if remotes.is_empty() {
        return Ok(params);
    }
    let mut devices = Vec::new();
    for (endpoint, _) in remotes {
        devices.push(rpc::add_remote(endpoint)?);
    }
    let layers: Vec<u32> = remotes.iter().map(|(_, l)| *l).collect();
    let lent = layers.iter().fold(0u32, |n, l| n.saturating_add(*l));
    if lent > layers_total {
        return Err(format!(
            "the remotes take {lent} layers; the model has {layers_total}"
        ));
    }
    let (offloaded, split) = rpc::tensor_split(&layers);
    tracing::info!(
        "{} of {layers_total} layers on {} remote devices ({layers:?}), {} here",
        lent,
        remotes.len(),
        layers_total - lent
    );
    Ok(params
        .with_devices(&devices)
        .map_err(|e| format!("cannot use the remote devices: {e}"))?
        .with_n_gpu_layers(offloaded)
        .with_tensor_split(&split))
}

/// Progress as layers: llama.cpp reports a fraction of the bytes loaded.
pub(super) fn progress_event(
    config: &Config,
    layers_total: u32,
    fraction: f32,
    size: u64,
) -> LoadingEvent {
    let fraction = fraction.clamp(0.0, 1.0);
    let layers_loaded = (fraction * layers_total as f32).floor() as u32;
    let mb = (f64::from(fraction) * size as f64 / 1_048_576.0) as u64;
    if config.gpu_layers > 0 && crate::GPU_BACKEND {
        LoadingEvent::LoadingToVram {
            layers_loaded,
            layers_total,
            vram_mb: mb,
        }
    } else {
        LoadingEvent::LoadingToRam {
            layers_loaded,
            layers_total,
            ram_mb: mb,
        }
    }
}
