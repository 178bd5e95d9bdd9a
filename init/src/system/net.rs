//! Loopback, the first Ethernet interface, and the hostname.

use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// no socket to send the interface ioctls on
    #[error("socket: {0}")]
    Socket(nix::errno::Errno),
    /// the name does not fit a struct ifreq
    #[error("interface name {0} too long")]
    NameTooLong(String),
    /// reading the interface's flags failed (no such interface?)
    #[error("{iface}: get flags: {source}")]
    GetFlags {
        iface: String,
        source: std::io::Error,
    },
    /// setting IFF_UP failed
    #[error("{iface}: set up: {source}")]
    SetUp {
        iface: String,
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: nix::libc::c_short,
    _pad: [u8; 22],
}

/// Sets IFF_UP on `iface`.
pub fn link_up(iface: &str) -> Result<(), LinkError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(LinkError::Socket)?;
    let mut req = IfreqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    let bytes = iface.as_bytes();
    if bytes.len() >= req.name.len() {
        return Err(LinkError::NameTooLong(iface.to_owned()));
    }
    req.name.iter_mut().zip(bytes).for_each(|(d, s)| *d = *s);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a struct ifreq, which
    // IfreqFlags lays out (name, then the flags member of the union, padded to 40 bytes).
    unsafe {
        if nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(LinkError::GetFlags {
                iface: iface.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        req.flags |= nix::libc::IFF_UP as nix::libc::c_short;
        if nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCSIFFLAGS as _, &req) < 0 {
            return Err(LinkError::SetUp {
                iface: iface.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The first Ethernet interface (ARPHRD_ETHER) by name, from a sysfs class/net dir.
pub fn first_ethernet(class_net: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(class_net)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .filter(|n| {
            std::fs::read_to_string(class_net.join(n).join("type")).is_ok_and(|t| t.trim() == "1")
        })
        .collect();
    names.sort();
    names.into_iter().next()
}

/// A valid hostname from a stored one, or `None`.
pub fn valid_hostname(s: &str) -> Option<String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    ok.then(|| s.to_owned())
}

/// `cloudlet-` and four hex digits from the kernel's random source.
pub fn new_hostname() -> String {
    let mut b = [0u8; 2];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    format!("cloudlet-{:02x}{:02x}", b[0], b[1])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_ethernet_by_name() {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in [
            ("lo", "772"),
            ("wlan0", "1"),
            ("eth0", "1"),
            ("sit0", "776"),
        ] {
            std::fs::create_dir(d.path().join(n)).unwrap();
            std::fs::write(d.path().join(n).join("type"), format!("{t}\n")).unwrap();
        }
        assert_eq!(first_ethernet(d.path()).as_deref(), Some("eth0"));
    }

    #[test]
    fn hostnames() {
        assert_eq!(
            valid_hostname(" cloudlet-ab12\n").as_deref(),
            Some("cloudlet-ab12")
        );
        assert!(valid_hostname("bad name").is_none());
        assert!(valid_hostname("-x").is_none());
        assert!(valid_hostname("").is_none());
        let h = new_hostname();
        assert!(valid_hostname(&h).is_some() && h.len() == 13, "{h}");
    }
}
