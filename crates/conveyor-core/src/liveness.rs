//! Whether the process that holds a reservation still lives, so that the jobs of a worker that
//! died come back in seconds instead of when their lease expires.
//!
//! A process names its reservations `<name>:<pid>:<machine>[.<suffix>]`, where `machine`
//! identifies this boot of this machine and this PID namespace (a hash of the kernel's boot id
//! and the namespace's inode): two containers that share a store but not a PID namespace never
//! judge each other's processes. A holder is dead when it names this machine and its process no
//! longer exists (or is a zombie). This is a fact the kernel gives, not a heartbeat a starved
//! process could miss, so a stalled but living worker is never robbed; and its lease token
//! still fences it. Holders on other machines, or named before this scheme, wait for their
//! lease as before.

use std::sync::OnceLock;

/// This machine's boot and PID namespace, as 12 hex digits; empty where it cannot be known (not
/// Linux), which turns the check off.
pub fn machine() -> &'static str {
    static MACHINE: OnceLock<String> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
        let ns = std::fs::read_link("/proc/self/ns/pid").ok();
        match (boot, ns) {
            (Some(boot), Some(ns)) => {
                use sha2::{Digest, Sha256};
                let mut h = Sha256::new();
                h.update(boot.trim().as_bytes());
                h.update(ns.to_string_lossy().as_bytes());
                h.finalize()[..6].iter().map(|b| format!("{b:02x}")).collect()
            }
            _ => String::new(),
        }
    })
}

/// The holder name of this process's reservations: `<name>:<pid>:<machine>[.<suffix>]`.
pub fn holder(name: &str, suffix: Option<&str>) -> String {
    let pid = std::process::id();
    match suffix {
        Some(s) => format!("{name}:{pid}:{}.{s}", machine()),
        None => format!("{name}:{pid}:{}", machine()),
    }
}

/// The pid and machine a holder name gives, if it follows [`holder`]'s form.
fn parse(holder: &str) -> Option<(u32, &str)> {
    let mut parts = holder.rsplitn(3, ':');
    let machine_part = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    let machine = machine_part.split('.').next().unwrap_or_default();
    Some((pid, machine))
}

/// Whether `holder` is a process of this machine that no longer runs.
pub fn is_dead(holder: &str) -> bool {
    let Some((pid, machine)) = parse(holder) else { return false };
    if machine.is_empty() || machine != self::machine() || pid == std::process::id() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Gone; or a zombie, dead but not yet waited for (the state follows the name, which
        // is in parentheses and may hold spaces).
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_of_this_machine_is_dead_only_when_its_process_is_gone() {
        if machine().is_empty() {
            return; // not Linux: the check is off, and is_dead is always false
        }
        let me = holder("host", Some("abc123"));
        assert!(!is_dead(&me), "this process lives");
        // A process that ran and was waited for: its pid is free now.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = format!("host:{pid}:{}.abc123", machine());
        assert!(is_dead(&gone), "{gone}");
        // A living process (pid 1) of this machine is alive; of another machine, unknown.
        assert!(!is_dead(&format!("host:1:{}", machine())));
        assert!(!is_dead(&format!("host:{pid}:000000000000.abc123")), "another machine's processes are not judged");
        assert!(!is_dead("host:12345:"), "no machine: not judged");
        assert!(!is_dead("vm:18847:f682a1f91e25"), "the old form: not judged");
        assert!(!is_dead("garbage"));
    }

    #[test]
    fn a_zombie_counts_as_dead() {
        if machine().is_empty() {
            return;
        }
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not waited for yet: a zombie once it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let name = format!("w:{pid}:{}", machine());
        while !is_dead(&name) {
            assert!(std::time::Instant::now() < deadline, "the exited child was never seen dead");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(is_dead(&name));
    }
}
