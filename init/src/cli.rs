//! The command line and the process's exit codes.

use std::path::PathBuf;

use cloudlet_proto::bootstate::Slot;

use crate::Options;

pub const USAGE: &str =
    "usage: cloudlet-init [--no-system] [--manifest FILE] [--etc DIR] [--control-socket PATH]
                     [--data DIR] [--disk DEV] [--slot A|B]";

/// How `cloudlet-init` ends when it is not PID 1 (PID 1 never exits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// every service stopped after a shutdown request
    Success = 0,
    /// init could not run (no runtime, no signal handlers)
    Failure = 1,
    /// bad command line (or `--help`)
    Usage = 2,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// `--help` was asked for
    #[error("{USAGE}")]
    Help,
    /// an option is missing its value
    #[error("{0} needs a value\n{USAGE}")]
    MissingValue(String),
    /// `--slot` is not A or B
    #[error("--slot {0}: expected A or B")]
    BadSlot(String),
    /// an argument init does not know
    #[error("unknown argument {0}\n{USAGE}")]
    Unknown(String),
}

/// Parses the arguments (without the program name). As PID 1, unknown
/// words are ignored: the kernel passes its unknown command-line words to init.
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    pid1: bool,
) -> Result<Options, ArgsError> {
    let mut o = Options {
        manifest: PathBuf::from("/etc/cloudlet/services.toml"),
        etc: PathBuf::from("/etc"),
        control_socket: PathBuf::from(cloudlet_proto::control::SOCKET_PATH),
        system: pid1,
        disk: None,
        slot: None,
        data_dir: PathBuf::from("/data"),
    };
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| ArgsError::MissingValue(a.clone()))
        };
        match a.as_str() {
            "--no-system" => o.system = false,
            "--manifest" => o.manifest = value()?.into(),
            "--etc" => o.etc = value()?.into(),
            "--control-socket" => o.control_socket = value()?.into(),
            "--data" => o.data_dir = value()?.into(),
            "--disk" => o.disk = Some(value()?.into()),
            "--slot" => {
                let v = value()?;
                o.slot = Some(Slot::parse(&v).ok_or(ArgsError::BadSlot(v))?);
            }
            "-h" | "--help" => return Err(ArgsError::Help),
            _ if pid1 => {}
            _ => return Err(ArgsError::Unknown(a)),
        }
    }
    Ok(o)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        let o = parse_args(
            args(&[
                "--no-system",
                "--manifest",
                "/m",
                "--slot",
                "B",
                "--disk",
                "/dev/vda",
            ]),
            true,
        )
        .unwrap();
        assert!(!o.system);
        assert_eq!(o.manifest, PathBuf::from("/m"));
        assert_eq!(o.slot, Some(Slot::B));
        assert_eq!(o.disk, Some(PathBuf::from("/dev/vda")));
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        assert_eq!(
            parse_args(args(&["--manifest"]), false).unwrap_err(),
            ArgsError::MissingValue("--manifest".into())
        );
        assert_eq!(
            parse_args(args(&["--slot", "C"]), false).unwrap_err(),
            ArgsError::BadSlot("C".into())
        );
        assert_eq!(
            parse_args(args(&["quiet"]), false).unwrap_err(),
            ArgsError::Unknown("quiet".into())
        );
        assert_eq!(
            parse_args(args(&["--help"]), true).unwrap_err(),
            ArgsError::Help
        );
        // PID 1 ignores the kernel's leftover words.
        assert!(parse_args(args(&["quiet", "splash"]), true).is_ok());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            [Exit::Success, Exit::Failure, Exit::Usage].map(|e| e as u8),
            [0, 1, 2]
        );
    }
}
