//! `cloudletd <service> [--listen ADDR] [--state-dir DIR]`: runs one service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cloudlet_runtime::ServiceOptions;

const USAGE: &str =
    "usage: cloudletd <storage|sync|sharing|updater> [--listen ADDR:PORT] [--state-dir DIR]";

/// Default port of each service on the box.
fn default_port(service: &str) -> Option<u16> {
    Some(match service {
        "sharing" => 8080,
        "storage" => 8081,
        "updater" => 8082,
        "sync" => 5984,
        _ => return None,
    })
}

fn parse() -> Result<(String, ServiceOptions), String> {
    let mut args = std::env::args().skip(1);
    let service = args.next().ok_or(USAGE)?;
    let port =
        default_port(&service).ok_or_else(|| format!("unknown service {service:?}\n{USAGE}"))?;
    let data = std::env::var_os("CLOUDLET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/data".into());
    let mut opts = ServiceOptions {
        listen: SocketAddr::from(([0, 0, 0, 0], port)),
        state_dir: data.join(&service),
    };
    while let Some(a) = args.next() {
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        match a.as_str() {
            "--listen" => opts.listen = v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?,
            "--state-dir" => opts.state_dir = v.into(),
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    Ok((service, opts))
}

fn main() -> ExitCode {
    let (service, opts) = match parse() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    cloudlet_runtime::init_logging(&service);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloudletd: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match service.as_str() {
            "storage" => cloudlet_storage::run(opts).await,
            "sync" => cloudlet_sync::run(opts).await,
            "sharing" => cloudlet_sharing::run(opts).await,
            "updater" => cloudlet_updater::run(opts).await,
            _ => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(service, error = %e, "stopped");
            ExitCode::FAILURE
        }
    }
}
