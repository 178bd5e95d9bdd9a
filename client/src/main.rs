//! `cloudlet`: the box's command-line client. On the box it talks to init's
//! control socket; from a PC it pairs with boxes and manages their devices
//! over HTTPS ([`remote`]).

mod flash;
mod pairbox;
mod remote;
mod sync;
mod update;

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
    /// The box's status and its services: on the box from init, from a PC
    /// from a paired box (over HTTPS, `--box`/`--host` as for `devices`).
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Which paired box (its ID); asks it over the network.
        #[arg(long = "box")]
        box_id: Option<String>,
        /// Where the box is, HOST[:PORT]; asks it over the network.
        #[arg(long)]
        host: Option<String>,
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
    /// The boxes on this LAN (announced over mDNS as _cloudlet._tcp).
    Discover {
        /// How long to listen.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// Pair this device with a box: press its button once, run this, check
    /// the box ID, press the button again (and have an owner approve the
    /// code if the box has one).
    Pair {
        /// The box: HOST or HOST:PORT (its web UI's port, 8080 by default),
        /// or its box ID (found on the LAN over mDNS); left out, the one box
        /// that answers on the LAN.
        target: Option<String>,
        /// What the box will call this device (default: this host's name).
        #[arg(long)]
        name: Option<String>,
        /// Pair as another Cloudlet (a box), not as a person's device.
        #[arg(long)]
        as_box: bool,
    },
    /// The devices paired with a box: list, rename, revoke.
    Devices {
        /// Which paired box (its ID); needed when this device has several.
        #[arg(long = "box")]
        box_id: Option<String>,
        /// Where the box is, HOST[:PORT], when it moved or was never reached
        /// (kept once the box answers with its pinned identity).
        #[arg(long)]
        host: Option<String>,
        #[command(subcommand)]
        cmd: Option<DevicesCmd>,
    },
    /// Pairings waiting on a box (owners): show the code, approve it.
    Pairing {
        #[arg(long = "box")]
        box_id: Option<String>,
        /// Where the box is, HOST[:PORT] (as for `devices`).
        #[arg(long)]
        host: Option<String>,
        #[command(subcommand)]
        cmd: PairingCmd,
    },
    /// Pair two boxes this device owns with each other (so they can sync
    /// and share): press both boxes' buttons, run this, then press the
    /// first box's button once more when asked.
    PairBox {
        /// The box that is asked (its ID).
        first: String,
        /// The box that asks it (its ID).
        second: String,
        /// Where the second box reaches the first, HOST[:PORT] (default:
        /// where this device reaches it).
        #[arg(long)]
        address: Option<String>,
    },
    /// Write a Cloudlet image to a card (or a file) and provision it: the
    /// box's identity is made here and pinned, and this device is its
    /// owner from the first boot, with no button press.
    Flash {
        /// The image (out/cloudlet-*.img).
        image: PathBuf,
        /// The card's block device (/dev/sdX, /dev/mmcblkN) or a file.
        target: PathBuf,
        /// What the box will call this device (default: this host's name).
        #[arg(long)]
        name: Option<String>,
        /// Only write the image: the box makes its own identity, and the
        /// first device pairs with the button.
        #[arg(long)]
        no_provision: bool,
        /// Do not ask before overwriting a block device.
        #[arg(long)]
        yes: bool,
    },
    /// A box's replications (its sync service replicating databases with
    /// other boxes, CouchDB or PouchDB servers): list, add, remove, state;
    /// and the web origins allowed to use it from a browser.
    Sync {
        /// Which paired box (its ID).
        #[arg(long = "box")]
        box_id: Option<String>,
        /// Where the box is, HOST[:PORT] (as for `devices`).
        #[arg(long)]
        host: Option<String>,
        /// The sync service's port on the box.
        #[arg(long, default_value_t = 5984)]
        port: u16,
        #[command(subcommand)]
        cmd: Option<SyncCmd>,
    },
    /// A box's system updates: its state, installing a bundle (a file sent
    /// from here, or a URL the box fetches), the update channel, rollback.
    Update {
        /// Which paired box (its ID).
        #[arg(long = "box", global = true)]
        box_id: Option<String>,
        /// Where the box is, HOST[:PORT] (as for `devices`).
        #[arg(long, global = true)]
        host: Option<String>,
        /// The updater's port on the box.
        #[arg(long, global = true, default_value_t = update::PORT)]
        port: u16,
        #[command(subcommand)]
        cmd: UpdateCmd,
    },
    /// Stop every service in order and reboot.
    Reboot,
    /// Stop every service in order and power off.
    Poweroff,
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// Every device the box knows (the default).
    List,
    /// Give a device another name.
    Rename { id: String, name: String },
    /// Forget a device: every service refuses it at once.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum SyncCmd {
    /// Every replication and its state (the default).
    List,
    /// Replicate SOURCE to TARGET. Each is a database on the box (`notes`),
    /// a URL (`https://NAME:PASSWORD@HOST:PORT/DB`), or a paired box's
    /// database (`box:BOXID/DB`).
    Add {
        source: String,
        target: String,
        /// Its name (default: made from SOURCE and TARGET).
        #[arg(long)]
        id: Option<String>,
        /// Replicate what is there now and stop (default: keep replicating).
        #[arg(long)]
        once: bool,
        /// Make the target database if it is missing.
        #[arg(long)]
        create_target: bool,
        /// Also replicate TARGET back to SOURCE (a second replication,
        /// named ID-back).
        #[arg(long)]
        both_ways: bool,
    },
    /// Stop a replication and forget it.
    Remove { id: String },
    /// A replication's state in detail (all of them without ID).
    State { id: Option<String> },
    /// The web origins besides the box's own pages allowed to call sync
    /// from a browser (owners change them).
    Cors {
        #[command(subcommand)]
        cmd: Option<CorsCmd>,
    },
}

#[derive(Subcommand)]
enum CorsCmd {
    /// The allowed origins (the default).
    List,
    /// Allow an origin, `https://HOST[:PORT]`.
    Add { origin: String },
    /// Allow an origin no more.
    Remove { origin: String },
}

#[derive(Subcommand, Debug, PartialEq)]
enum UpdateCmd {
    /// The running release, the A/B slots, what the updater is doing, how
    /// the last install ended, and the channel.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install a bundle (owners only): a FILE here is sent to the box; an
    /// http:// or https:// URL is fetched by the box. The box then reboots
    /// into the slot it wrote.
    Apply {
        /// A bundle file, or the URL of one.
        bundle: String,
        /// Install it even if it is not newer than what the box runs.
        #[arg(long)]
        allow_downgrade: bool,
        /// Do not reboot once it is written: it boots at the next reboot.
        #[arg(long)]
        no_reboot: bool,
    },
    /// Ask the update channel now whether a newer release is there.
    Check {
        /// Install it when there is one (the box then reboots into it).
        #[arg(long)]
        install: bool,
    },
    /// Boot the other slot again (the release before the last install),
    /// rebooting into it.
    Rollback,
    /// Show the update channel, or set it: where the box looks for new
    /// releases, how often, and whether it installs them by itself.
    Channel {
        /// The channel's signed index, https://HOST/PATH.
        #[arg(conflicts_with = "none")]
        url: Option<String>,
        /// Remove the channel: the box updates only when a bundle is pushed.
        #[arg(long, conflicts_with_all = ["interval", "no_auto_install"])]
        none: bool,
        /// Seconds between checks (default 21600, six hours).
        #[arg(long, value_name = "SECS")]
        interval: Option<u64>,
        /// Only tell of new releases; install them when asked
        /// (`cloudlet update check --install`).
        #[arg(long)]
        no_auto_install: bool,
    },
}

impl UpdateCmd {
    /// What `update channel` is asked to do.
    fn channel_change(
        url: Option<String>,
        none: bool,
        interval: Option<u64>,
        no_auto_install: bool,
    ) -> update::ChannelChange {
        if none {
            update::ChannelChange::Remove
        } else if url.is_none() && interval.is_none() && !no_auto_install {
            update::ChannelChange::Show
        } else {
            update::ChannelChange::Set {
                url,
                interval_s: interval,
                no_auto_install,
            }
        }
    }
}

#[derive(Subcommand)]
enum PairingCmd {
    /// The device waiting to pair, and its code.
    Show,
    /// Approve the waiting device, by the code it shows.
    Approve { code: String },
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

/// Runs a command that talks to a box over the network.
fn remote<F: std::future::Future<Output = Result<(), String>>>(f: F) -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f)
}

/// The status of a paired box, as its web UI tells it (`/api/status`).
fn remote_status(box_id: Option<&str>, host: Option<&str>) -> Result<Status, String> {
    let mut got = None;
    remote(async {
        got = Some(remote::call_at(box_id, host, "GET", "/api/status", None).await?);
        Ok(())
    })?;
    serde_json::from_value(got.unwrap_or_default())
        .map_err(|e| format!("the box's status is not what this command understands: {e}"))
}

fn print_news(news: &serde_json::Value) {
    let news = news["news"].as_array().cloned().unwrap_or_default();
    if news.is_empty() {
        return;
    }
    println!();
    println!("Paired since this device last looked:");
    for d in news {
        println!(
            "  {} {} ({}, {})",
            d["id"].as_str().unwrap_or("?"),
            d["name"].as_str().unwrap_or("?"),
            d["role"].as_str().unwrap_or("?"),
            d["paired_how"].as_str().unwrap_or("?"),
        );
    }
}

fn print_devices(list: &serde_json::Value) {
    let you = list["you"].as_str().unwrap_or_default();
    println!(
        "{:<12} {:<7} {:<16} {:<24} NAME",
        "ID", "ROLE", "PAIRED", "KEY"
    );
    for d in list["devices"].as_array().into_iter().flatten() {
        let id = d["id"].as_str().unwrap_or("?");
        let key = d["key"]
            .as_str()
            .map(|k| k.get(..16).unwrap_or(k).to_owned() + "…");
        println!(
            "{:<12} {:<7} {:<16} {:<24} {}{}",
            id,
            d["role"].as_str().unwrap_or("?"),
            d["paired_how"].as_str().unwrap_or("?"),
            key.unwrap_or_else(|| "(token)".into()),
            d["name"].as_str().unwrap_or("?"),
            if id == you { "  (this device)" } else { "" },
        );
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let sock = cli.socket.as_path();
    match cli.cmd {
        Cmd::Flash {
            image,
            target,
            name,
            no_provision,
            yes,
        } => {
            let opts = flash::Options {
                image,
                target,
                name: name.unwrap_or_else(|| {
                    nix::unistd::gethostname()
                        .map(|h| h.to_string_lossy().into_owned())
                        .unwrap_or_else(|_| "owner".into())
                }),
                provision: !no_provision,
                yes,
            };
            let (cfg, sudo_user) = flash::config()?;
            let done = flash::flash(&opts, &cfg).map_err(|e| e.to_string());
            if let Some(u) = &sudo_user {
                flash::give_back(&cfg, u)?;
            }
            let done = done?;
            println!("Wrote {} bytes to {}.", done.bytes, opts.target.display());
            if let Some(id) = done.box_id {
                println!("Box ID:  {id}");
                println!("This device is the box's owner from its first boot: once it is up,");
                println!("`cloudlet devices --box {id}` finds it on the LAN (or add --host HOST).");
            }
        }
        Cmd::Discover { seconds } => {
            let found = remote::discover(seconds)?;
            if found.is_empty() {
                println!("no box answered within {seconds} s");
            }
            let pinned = remote::Config::open()
                .and_then(|c| c.boxes())
                .unwrap_or_default();
            for f in found {
                let addrs: Vec<String> = f.addresses.iter().map(|a| a.to_string()).collect();
                println!(
                    "{}  {}  {}:{}{}",
                    f.box_id,
                    f.host,
                    addrs.join(","),
                    f.port,
                    if pinned.contains_key(&f.box_id) {
                        "  (paired)"
                    } else {
                        ""
                    }
                );
            }
        }
        Cmd::Pair {
            target,
            name,
            as_box,
        } => remote(async move {
            let name = name.unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "device".into())
            });
            let (host, expect) = remote::pair_target(target.as_deref()).await?;
            println!(
                "{}",
                remote::pair(&host, expect.as_deref(), &name, as_box).await?
            );
            Ok(())
        })?,
        Cmd::Devices { box_id, host, cmd } => remote(async move {
            let (b, h) = (box_id.as_deref(), host.as_deref());
            match cmd.unwrap_or(DevicesCmd::List) {
                DevicesCmd::List => {
                    let list = remote::call_at(b, h, "GET", "/api/devices", None).await?;
                    print_devices(&list);
                    // An owner is told of every pairing since it last looked.
                    let me = list["you"].as_str().unwrap_or_default();
                    let owner = list["devices"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|d| d["id"] == me && d["role"] == "owner");
                    if owner {
                        let news = remote::call_at(b, h, "POST", "/api/pairing/news", None).await?;
                        print_news(&news);
                    }
                }
                DevicesCmd::Rename { id, name } => {
                    let path = format!("/api/devices/{id}/name");
                    remote::call_at(b, h, "PUT", &path, Some(serde_json::json!({"name": name})))
                        .await?;
                    println!("renamed {id} to {name}");
                }
                DevicesCmd::Revoke { id } => {
                    remote::call_at(b, h, "DELETE", &format!("/api/devices/{id}"), None).await?;
                    println!("revoked {id}: every service refuses it now");
                }
            }
            Ok(())
        })?,
        Cmd::Pairing { box_id, host, cmd } => remote(async move {
            let (b, h) = (box_id.as_deref(), host.as_deref());
            match cmd {
                PairingCmd::Show => {
                    let s = remote::call_at(b, h, "GET", "/api/pairing", None).await?;
                    match s["pending"].as_object() {
                        Some(p) => println!(
                            "{} ({}, from {}) waits to pair: read the code on that device, then `cloudlet pairing approve CODE`{}",
                            p["name"].as_str().unwrap_or("?"),
                            p["kind"].as_str().unwrap_or("?"),
                            p["from"].as_str().unwrap_or("an unknown address"),
                            if p["pressed"].as_bool() == Some(true) {
                                "; the button was pressed"
                            } else {
                                ""
                            }
                        ),
                        None if s["open"].as_bool() == Some(true) => {
                            println!("the pairing window is open; no device waits")
                        }
                        None => println!("the pairing window is closed"),
                    }
                }
                PairingCmd::Approve { code } => {
                    remote::call_at(
                        b,
                        h,
                        "POST",
                        "/api/pairing/approve",
                        Some(serde_json::json!({"code": code})),
                    )
                    .await?;
                    println!("approved: the device is paired once the box's button is pressed a second time");
                }
            }
            Ok(())
        })?,
        Cmd::PairBox {
            first,
            second,
            address,
        } => remote(async move {
            println!(
                "{}",
                pairbox::pair_box(&first, &second, address.as_deref()).await?
            );
            Ok(())
        })?,
        Cmd::Sync {
            box_id,
            host,
            port,
            cmd,
        } => remote(async move {
            let at = sync::At {
                box_id: box_id.as_deref(),
                host: host.as_deref(),
                port,
            };
            match cmd.unwrap_or(SyncCmd::List) {
                SyncCmd::List => sync::list(&at).await?,
                SyncCmd::Add {
                    source,
                    target,
                    id,
                    once,
                    create_target,
                    both_ways,
                } => {
                    let id = id.unwrap_or_else(|| sync::default_id(&source, &target));
                    let there = sync::add(&at, &source, &target, Some(&id), !once, create_target);
                    println!("{}", there.await?);
                    if both_ways {
                        let back = format!("{id}-back");
                        let back =
                            sync::add(&at, &target, &source, Some(&back), !once, create_target);
                        println!("{}", back.await?);
                    }
                }
                SyncCmd::Remove { id } => println!("{}", sync::remove(&at, &id).await?),
                SyncCmd::State { id } => sync::state(&at, id.as_deref()).await?,
                SyncCmd::Cors { cmd } => {
                    let mut origins = sync::cors_origins(&at).await?;
                    match cmd.unwrap_or(CorsCmd::List) {
                        CorsCmd::List => {
                            if origins.is_empty() {
                                println!("only the box's own pages");
                            }
                            for o in &origins {
                                println!("{o}");
                            }
                        }
                        CorsCmd::Add { origin } => {
                            sync::check_origin(&origin)?;
                            if !origins.contains(&origin) {
                                origins.push(origin.clone());
                                sync::set_cors_origins(&at, &origins).await?;
                            }
                            println!("{origin} may call sync from a browser now");
                        }
                        CorsCmd::Remove { origin } => {
                            let before = origins.len();
                            origins.retain(|o| o != &origin);
                            if origins.len() == before {
                                return Err(format!("{origin} was not allowed"));
                            }
                            sync::set_cors_origins(&at, &origins).await?;
                            println!("{origin} may not call sync any more");
                        }
                    }
                }
            }
            Ok(())
        })?,
        Cmd::Update {
            box_id,
            host,
            port,
            cmd,
        } => remote(async move {
            let at = update::At {
                box_id: box_id.as_deref(),
                host: host.as_deref(),
                port,
            };
            match cmd {
                UpdateCmd::Status { json } => update::status(&at, json).await?,
                UpdateCmd::Apply {
                    bundle,
                    allow_downgrade,
                    no_reboot,
                } => {
                    let how = update::Install {
                        allow_downgrade,
                        reboot: !no_reboot,
                    };
                    let done = match update::Source::parse(&bundle) {
                        update::Source::File(f) => update::apply_file(&at, &f, how).await?,
                        update::Source::Url(u) => update::apply_url(&at, &u, how).await?,
                    };
                    println!("{done}");
                }
                UpdateCmd::Check { install } => println!("{}", update::check(&at, install).await?),
                UpdateCmd::Rollback => println!("{}", update::rollback(&at).await?),
                UpdateCmd::Channel {
                    url,
                    none,
                    interval,
                    no_auto_install,
                } => {
                    let change = UpdateCmd::channel_change(url, none, interval, no_auto_install);
                    update::channel(&at, &change).await?;
                }
            }
            Ok(())
        })?,
        Cmd::Status { json, box_id, host } => {
            // On the box, init answers; anywhere else, a paired box does.
            let remote_box = box_id.is_some() || host.is_some() || !sock.exists();
            let s = if remote_box {
                remote_status(box_id.as_deref(), host.as_deref()).map_err(|e| {
                    if sock.exists() {
                        e
                    } else {
                        format!(
                            "{e} (and {} is not here: this is not a box)",
                            sock.display()
                        )
                    }
                })?
            } else {
                status(sock)?
            };
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
            if remote_box {
                // The box's sync service, on the same host.
                let at = sync::At {
                    box_id: box_id.as_deref(),
                    host: host.as_deref(),
                    port: 5984,
                };
                let mut line = String::new();
                let _ = remote(async {
                    line = sync::summary(&at)
                        .await
                        .unwrap_or_else(|e| format!("unavailable ({e})"));
                    Ok(())
                });
                println!("sync:    {line}");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `update` command's box, host, port and subcommand, parsed.
    fn parse_update(args: &[&str]) -> (Option<String>, Option<String>, u16, UpdateCmd) {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.cmd {
            Cmd::Update {
                box_id,
                host,
                port,
                cmd,
            } => (box_id, host, port, cmd),
            _ => panic!("{args:?} is not an update command"),
        }
    }

    #[test]
    fn update_apply_takes_the_bundle_and_its_flags_with_the_box_anywhere() {
        let (b, h, port, cmd) = parse_update(&[
            "cloudlet",
            "update",
            "--box",
            "abcd-efgh-ijkm-nopq",
            "apply",
            "out/cloudlet.bundle",
            "--allow-downgrade",
            "--no-reboot",
            "--host",
            "10.0.0.2",
        ]);
        assert_eq!(b.as_deref(), Some("abcd-efgh-ijkm-nopq"));
        assert_eq!(h.as_deref(), Some("10.0.0.2"));
        assert_eq!(port, 8082);
        assert_eq!(
            cmd,
            UpdateCmd::Apply {
                bundle: "out/cloudlet.bundle".into(),
                allow_downgrade: true,
                no_reboot: true,
            }
        );
        let (_, _, port, cmd) = parse_update(&[
            "cloudlet",
            "update",
            "apply",
            "https://u.example/b",
            "--port",
            "9000",
        ]);
        assert_eq!(port, 9000);
        assert_eq!(
            cmd,
            UpdateCmd::Apply {
                bundle: "https://u.example/b".into(),
                allow_downgrade: false,
                no_reboot: false,
            }
        );
    }

    #[test]
    fn update_apply_needs_a_bundle() {
        assert!(Cli::try_parse_from(["cloudlet", "update", "apply"]).is_err());
        assert!(Cli::try_parse_from(["cloudlet", "update"]).is_err());
    }

    #[test]
    fn update_status_check_and_rollback_parse() {
        assert_eq!(
            parse_update(&["cloudlet", "update", "status", "--json"]).3,
            UpdateCmd::Status { json: true }
        );
        assert_eq!(
            parse_update(&["cloudlet", "update", "status"]).3,
            UpdateCmd::Status { json: false }
        );
        assert_eq!(
            parse_update(&["cloudlet", "update", "check", "--install"]).3,
            UpdateCmd::Check { install: true }
        );
        assert_eq!(
            parse_update(&["cloudlet", "update", "rollback"]).3,
            UpdateCmd::Rollback
        );
    }

    fn change(args: &[&str]) -> update::ChannelChange {
        match parse_update(args).3 {
            UpdateCmd::Channel {
                url,
                none,
                interval,
                no_auto_install,
            } => UpdateCmd::channel_change(url, none, interval, no_auto_install),
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn update_channel_shows_sets_or_removes() {
        assert_eq!(
            change(&["cloudlet", "update", "channel"]),
            update::ChannelChange::Show
        );
        assert_eq!(
            change(&["cloudlet", "update", "channel", "--none"]),
            update::ChannelChange::Remove
        );
        assert_eq!(
            change(&[
                "cloudlet",
                "update",
                "channel",
                "https://u.example/index",
                "--interval",
                "3600",
                "--no-auto-install"
            ]),
            update::ChannelChange::Set {
                url: Some("https://u.example/index".into()),
                interval_s: Some(3600),
                no_auto_install: true,
            }
        );
        assert_eq!(
            change(&["cloudlet", "update", "channel", "--interval", "60"]),
            update::ChannelChange::Set {
                url: None,
                interval_s: Some(60),
                no_auto_install: false,
            }
        );
        for bad in [
            &[
                "cloudlet",
                "update",
                "channel",
                "https://u.example/i",
                "--none",
            ][..],
            &["cloudlet", "update", "channel", "--none", "--interval", "5"],
            &["cloudlet", "update", "channel", "--interval", "soon"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} parsed");
        }
    }
}
