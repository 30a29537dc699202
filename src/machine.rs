//! Facts about this machine, from the OS's own calls: memory, a process's
//! resident memory, the host name; and its GPUs, from llama.cpp's device registry. Through `sysinfo`, which has a branch per
//! OS (Linux, macOS, Windows), so nothing here assumes `/proc`.

use std::collections::HashMap;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

const MIB: u64 = 1 << 20;

/// The machine's RAM, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ram {
    pub total_mb: u64,
    /// What the OS could give a new process without swapping.
    pub available_mb: u64,
}

pub fn ram() -> Ram {
    let mut sys = System::new();
    sys.refresh_memory();
    Ram {
        total_mb: sys.total_memory() / MIB,
        available_mb: sys.available_memory() / MIB,
    }
}

/// The resident memory of each of these processes that still runs, in MiB.
pub fn resident_mb(pids: &[u32]) -> HashMap<u32, u64> {
    let pids: Vec<Pid> = pids.iter().map(|p| Pid::from_u32(*p)).collect();
    let mut sys = System::new();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&pids),
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    pids.iter()
        .filter_map(|pid| Some((pid.as_u32(), sys.process(*pid)?.memory() / MIB)))
        .collect()
}

/// Whether a process runs; a zombie waiting to be reaped does not count.
pub fn running(pid: u32) -> bool {
    let pid = Pid::from_u32(pid);
    let mut sys = System::new();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing(),
    );
    sys.process(pid).is_some_and(|p| {
        !matches!(
            p.status(),
            sysinfo::ProcessStatus::Zombie | sysinfo::ProcessStatus::Dead
        )
    })
}

pub fn hostname() -> String {
    System::host_name().unwrap_or_default()
}

/// The cores llama.cpp should use by default: every one this process may run on.
pub fn cores() -> u32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as u32)
}

/// This machine's addresses beyond loopback (IPv6 link-local ones left out:
/// they need an interface named to be reached), IPv4 first.
pub fn addresses() -> Vec<std::net::IpAddr> {
    let mut all: Vec<std::net::IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback())
        .filter(
            |ip| !matches!(ip, std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80),
        )
        .collect();
    all.sort_by_key(|ip| ip.is_ipv6());
    all.dedup();
    all
}

/// The GPUs llama.cpp can use in this build (none in a CPU-only build).
pub fn gpus() -> Vec<crate::protocol::GpuInfo> {
    use llama_cpp_2::LlamaBackendDeviceType as Kind;
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| matches!(d.device_type, Kind::Gpu | Kind::IntegratedGpu))
        .enumerate()
        .map(|(i, d)| crate::protocol::GpuInfo {
            index: i as u32,
            name: d.name,
            description: d.description,
            memory_total_mb: (d.memory_total >> 20) as u64,
            memory_free_mb: (d.memory_free >> 20) as u64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_reaped_child_does_not() {
        assert!(running(std::process::id()));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("true runs");
        let pid = child.id();
        child.wait().expect("reaped");
        assert!(!running(pid));
    }

    #[test]
    fn this_machine_has_memory_and_this_process_a_resident_set() {
        let ram = ram();
        assert!(
            ram.total_mb > 0 && ram.available_mb <= ram.total_mb,
            "{ram:?}"
        );
        let me = std::process::id();
        let rss = resident_mb(&[me, u32::MAX - 1]);
        assert!(rss.get(&me).is_some_and(|mb| *mb > 0), "{rss:?}");
        assert!(!rss.contains_key(&(u32::MAX - 1)));
    }
}
