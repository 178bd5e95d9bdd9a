//! What only PID 1 does: filesystems, kernel modules, the disk, the network,
//! the clock, power. Everything here is called from [`crate::run`] and
//! [`crate::stage1`]; parsers are pure functions with tests.

pub mod clock;
pub mod cmdline;
pub mod disk;
pub mod ext4;
pub mod kmod;
pub mod mounts;
pub mod net;
pub mod sntp;

/// Seconds since boot, from CLOCK_BOOTTIME (what the kernel's log stamps use).
pub fn uptime() -> std::time::Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(std::time::Duration::from)
        .unwrap_or_default()
}

/// Resident set size of a process in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&text)
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_vmrss() {
        assert_eq!(
            super::parse_vmrss("Name:\tx\nVmRSS:\t    1234 kB\n"),
            Some(1234)
        );
        assert_eq!(super::parse_vmrss("Name:\tkthread\n"), None);
    }
}
