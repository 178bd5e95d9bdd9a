//! `cloudlet-bundle`: make signing keys, make and check update bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Cloudlet update bundles: keys, create, verify")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a signing key (secret, 0600) and its public key; never overwrites a secret.
    Keygen {
        #[arg(long)]
        secret: PathBuf,
        #[arg(long)]
        public: PathBuf,
    },
    /// Make a signed bundle of a kernel, initramfs and root filesystem.
    Create {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        board: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        /// A public key file this release introduces (key rotation: boxes
        /// that commit it trust bundles signed by that key). Repeatable.
        #[arg(long)]
        introduce: Vec<PathBuf>,
    },
    /// Sign a channel index naming a bundle: the box polls it and installs
    /// the bundle when it is newer, until the index expires.
    Index {
        #[arg(long)]
        key: PathBuf,
        /// The bundle the index names (its version, board, size and hash are read from it).
        #[arg(long)]
        bundle: PathBuf,
        /// The bundle's URL, absolute or relative to the index's (default: its file name).
        #[arg(long)]
        url: Option<String>,
        /// Seconds until boxes stop believing this index.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        expires_in: u64,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Check a bundle's signature and every part's size and hash.
    Verify {
        /// A public key file, or a folder of *.pub files.
        #[arg(long)]
        trusted: PathBuf,
        bundle: PathBuf,
    },
}

fn run(cli: Cli) -> Result<String, cloudlet_bundle::BundleError> {
    use cloudlet_bundle::*;
    match cli.cmd {
        Cmd::Keygen { secret, public } => {
            keygen(&secret, &public)?;
            Ok(format!(
                "made {} and {}",
                secret.display(),
                public.display()
            ))
        }
        Cmd::Create {
            key,
            board,
            version,
            kernel,
            initrd,
            rootfs,
            output,
            introduce,
        } => {
            let key = load_secret(&key)?;
            let introduce = introduce
                .iter()
                .map(|p| load_public(p))
                .collect::<Result<Vec<_>, _>>()?;
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // Written aside and renamed: a failed run leaves no bundle that looks whole.
            let tmp = output.with_extension("partial");
            let out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let m = create_introducing(
                out,
                &key,
                &board,
                &version,
                created,
                &[&kernel, &initrd, &rootfs],
                &introduce,
            );
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::rename(&tmp, &output)?;
            Ok(format!(
                "{}: {} {} ({} bytes of parts)",
                output.display(),
                m.board,
                m.version,
                m.parts.iter().map(|p| p.size).sum::<u64>()
            ))
        }
        Cmd::Index {
            key,
            bundle,
            url,
            expires_in,
            output,
        } => {
            let secret = load_secret(&key)?;
            // The manifest says what the bundle is; the whole file's hash binds the index to it.
            let f = std::io::BufReader::new(std::fs::File::open(&bundle)?);
            let m = verify(f, &[secret.verifying_key()], |_| Ok(std::io::sink()))?;
            let mut h = blake3::Hasher::new();
            let size = std::io::copy(&mut std::fs::File::open(&bundle)?, &mut h)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let name = bundle
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let index = Index {
                format: FORMAT,
                board: m.board,
                version: m.version,
                url: url.unwrap_or(name),
                size,
                blake3: h.finalize().to_hex().to_string(),
                created: now,
                expires: now.saturating_add(expires_in),
            };
            std::fs::write(&output, sign_index(&secret, &index)?)?;
            Ok(format!(
                "{}: {} {} at {}, expires {}",
                output.display(),
                index.board,
                index.version,
                index.url,
                index.expires
            ))
        }
        Cmd::Verify { trusted, bundle } => {
            let keys = if trusted.is_dir() {
                load_trusted(&trusted)?
            } else {
                vec![load_public(&trusted)?]
            };
            let f = std::io::BufReader::new(std::fs::File::open(&bundle)?);
            let m = verify(f, &keys, |_| Ok(std::io::sink()))?;
            Ok(format!(
                "{}: good: {} {}",
                bundle.display(),
                m.board,
                m.version
            ))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cloudlet-bundle: {e}");
            ExitCode::FAILURE
        }
    }
}
