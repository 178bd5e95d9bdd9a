//! `cloudlet`: the box's command-line client. On the box it talks to init's
//! control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloudlet_proto::control::{self, Request, Response, Status};

#[derive(Parser)]
#[command(name = "cloudlet", version, about = "Talk to a Cloudlet box")]
struct Cli {
    /// init's control socket.
    #[arg(long, global = true, default_value = control::SOCKET_PATH, env = "CLOUDLET_CONTROL_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The box's status and its services.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Supervised services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Button presses on the box (pairing listens for short presses).
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Wait up to this many seconds for one.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Stop every service in order and reboot.
    Reboot,
    /// Stop every service in order and power off.
    Poweroff,
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// List services and their state.
    List,
    /// Restart a service (also clears a give-up).
    Restart { name: String },
    /// Show a service's captured output.
    Logs {
        name: String,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
    },
}

fn call(socket: &std::path::Path, req: Request) -> Result<Response, String> {
    match control::call(socket, &req).map_err(|e| e.to_string())? {
        Response::Error { message } => Err(message),
        r => Ok(r),
    }
}

fn status(socket: &std::path::Path) -> Result<Status, String> {
    match call(socket, Request::Status)? {
        Response::Status(s) => Ok(*s),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

fn print_services(s: &Status) {
    println!(
        "{:<12} {:<9} {:>7} {:>8} {:>9}  LAST EXIT",
        "SERVICE", "STATE", "PID", "RESTARTS", "RSS KiB"
    );
    for svc in &s.services {
        println!(
            "{:<12} {:<9} {:>7} {:>8} {:>9}  {}",
            svc.name,
            format!("{:?}", svc.state).to_lowercase(),
            svc.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            svc.restarts,
            svc.rss_kib
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            svc.last_exit.as_deref().unwrap_or("-"),
        );
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let sock = cli.socket.as_path();
    match cli.cmd {
        Cmd::Status { json } => {
            let s = status(sock)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            println!(
                "{} — Cloudlet {}, slot {}",
                s.hostname,
                s.version,
                s.slot.as_deref().unwrap_or("?")
            );
            println!("ready:   {}", if s.all_ready { "yes" } else { "no" });
            println!("uptime:  {:.1} s", s.uptime_ms as f64 / 1000.0);
            println!("clock:   {}", format!("{:?}", s.clock).to_lowercase());
            match &s.data {
                Some(d) => println!(
                    "data:    {} ({} MiB, {} MiB free, {}{}{})",
                    d.device,
                    d.size_bytes >> 20,
                    d.free_bytes >> 20,
                    if d.was_clean {
                        "was clean"
                    } else {
                        "was NOT cleanly unmounted"
                    },
                    if d.created { ", created this boot" } else { "" },
                    if d.grown { ", grown this boot" } else { "" },
                ),
                None => println!("data:    not mounted"),
            }
            if let Some(r) = s.init_rss_kib {
                println!("init:    {r} KiB resident");
            }
            if let Some(b) = &s.board {
                println!(
                    "board:   {} (LEDs: {}, watchdog: {})",
                    b.name,
                    b.led,
                    if b.watchdog { "on" } else { "none" }
                );
                for p in &b.power {
                    println!("  power: {p}");
                }
            }
            println!();
            print_services(&s);
        }
        Cmd::Service(ServiceCmd::List) => print_services(&status(sock)?),
        Cmd::Service(ServiceCmd::Restart { name }) => {
            call(
                sock,
                Request::Restart {
                    service: name.clone(),
                },
            )?;
            println!("restarting {name}");
        }
        Cmd::Service(ServiceCmd::Logs { name, lines }) => match call(
            sock,
            Request::Logs {
                service: name,
                lines,
            },
        )? {
            Response::Logs { lines, .. } => lines.iter().for_each(|l| println!("{l}")),
            other => return Err(format!("unexpected answer: {other:?}")),
        },
        Cmd::Events { after, wait } => {
            let req = Request::Events {
                after,
                wait_ms: wait.map(|s| s * 1000),
            };
            match call(sock, req)? {
                Response::Events { events } => {
                    for e in events {
                        println!("{} {} {:.3}", e.seq, e.kind, e.uptime_ms as f64 / 1000.0);
                    }
                }
                other => return Err(format!("unexpected answer: {other:?}")),
            }
        }
        Cmd::Reboot => {
            call(sock, Request::Reboot)?;
            println!("rebooting");
        }
        Cmd::Poweroff => {
            call(sock, Request::PowerOff)?;
            println!("powering off");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloudlet: {e}");
            ExitCode::FAILURE
        }
    }
}
