//! `cloudletd <service> [--listen ADDR] [--state-dir DIR]`: runs one service.
//!
//! `cloudletd sharing add-device NAME [owner|device]`, `cloudletd sharing
//! revoke ID` and `cloudletd sharing devices`: root on the box (or the user
//! who runs a host run) changes the device registry of the running sharing
//! service directly, over the bus, as anyone holding the box could.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cloudlet_runtime::ServiceOptions;

const USAGE: &str =
    "usage: cloudletd <storage|sync|sharing|updater> [--listen ADDR:PORT] [--state-dir DIR]
       cloudletd sharing add-device NAME [owner|device|box [--key SHA256-OF-ITS-PUBLIC-KEY]]
                                                   (prints the device's id, and its token if no key)
       cloudletd sharing revoke ID
       cloudletd sharing devices
       cloudletd sharing press    (the button, for pairing, where there is none: host runs)";

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
        plain: false,
    };
    while let Some(a) = args.next() {
        if a == "--plain" {
            opts.plain = true;
            continue;
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        match a.as_str() {
            "--listen" => opts.listen = v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?,
            "--state-dir" => opts.state_dir = v.into(),
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    opts.check()?;
    Ok((service, opts))
}

/// The owner commands: `add-device`, `revoke`, `devices` (see the crate docs).
fn owner_command(args: &[String]) -> Result<String, String> {
    use cloudlet_runtime::registry::{call, connect, socket_path};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let socket = socket_path();
        let conn = connect(&socket).await.map_err(|e| {
            format!(
                "cannot reach the device registry at {} ({e}): is the sharing service running?",
                socket.display()
            )
        })?;
        let fail = |e: zbus::Error| match e {
            zbus::Error::MethodError(_, Some(m), _) => m,
            e => e.to_string(),
        };
        match args {
            [cmd, name] if cmd == "add-device" => {
                add(&conn, name, "device", "").await.map_err(fail)
            }
            [cmd, name, role] if cmd == "add-device" => {
                add(&conn, name, role, "").await.map_err(fail)
            }
            [cmd, name, role, flag, key] if cmd == "add-device" && flag == "--key" => {
                add(&conn, name, role, key).await.map_err(fail)
            }
            [cmd, id] if cmd == "revoke" => call::<_, ()>(&conn, "Revoke", &(id.as_str(),))
                .await
                .map(|()| format!("revoked {id}"))
                .map_err(fail),
            [cmd] if cmd == "devices" => call::<_, String>(&conn, "List", &()).await.map_err(fail),
            [cmd] if cmd == "press" => call::<_, ()>(&conn, "Press", &())
                .await
                .map(|()| "pressed".to_owned())
                .map_err(fail),
            _ => Err(USAGE.to_owned()),
        }
    })
}

async fn add(conn: &zbus::Connection, name: &str, role: &str, key: &str) -> zbus::Result<String> {
    let (id, token): (String, String) =
        cloudlet_runtime::registry::call(conn, "AddDevice", &(name, role, key)).await?;
    Ok(if token.is_empty() {
        format!("device {id}")
    } else {
        format!("device {id}\ntoken {token}")
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "sharing")
        && args
            .get(1)
            .is_some_and(|a| matches!(a.as_str(), "add-device" | "revoke" | "devices" | "press"))
    {
        return match owner_command(args.get(1..).unwrap_or_default()) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cloudletd: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
