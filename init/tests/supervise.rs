//! Black-box tests: the real `cloudlet-init` binary, unprivileged mode,
//! supervising small shell services in a temporary directory, driven over its
//! control socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cloudlet_proto::control::{call, Request, Response, ServiceState, Status};

struct Init {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Init {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(manifest: &str) -> Init {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("services.toml");
    std::fs::write(
        &m,
        manifest.replace("@DIR@", &dir.path().display().to_string()),
    )
    .unwrap();
    let sock = dir.path().join("control.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_cloudlet-init"))
        .args(["--no-system", "--manifest"])
        .arg(&m)
        .arg("--control-socket")
        .arg(&sock)
        .arg("--data")
        .arg(dir.path())
        .spawn()
        .unwrap();
    let init = Init {
        child,
        sock,
        _dir: dir,
    };
    // The socket file appears at bind(), a moment before listen(): wait for an answer.
    wait_for("control socket", || {
        call(&init.sock, &Request::Status).ok().map(|_| ())
    });
    init
}

/// Polls `f` until it gives a value; panics with `what` after a generous timeout.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn status(sock: &Path) -> Status {
    match call(sock, &Request::Status).unwrap() {
        Response::Status(s) => *s,
        r => panic!("unexpected {r:?}"),
    }
}

fn svc<'a>(s: &'a Status, name: &str) -> &'a cloudlet_proto::control::ServiceInfo {
    s.services.iter().find(|x| x.name == name).unwrap()
}

fn logs(sock: &Path, name: &str) -> Vec<String> {
    match call(
        sock,
        &Request::Logs {
            service: name.into(),
            lines: None,
        },
    )
    .unwrap()
    {
        Response::Logs { lines, .. } => lines,
        r => panic!("unexpected {r:?}"),
    }
}

#[test]
fn starts_in_order_reports_ready_and_captures_output() {
    let init = start(
        r#"
        [[service]]
        name = "web"
        exec = ["/bin/sh", "-c", "echo web sees $CLOUDLET_SERVICE in $(pwd) as $(id -u) with A=$A; test -e @DIR@/db-ready && echo db was ready; echo READY >&3; exec sleep 1000"]
        after = ["db"]
        user = "nobody"
        working-dir = "/tmp"
        env = { A = "b c" }

        [[service]]
        name = "db"
        exec = ["/bin/sh", "-c", "echo starting db; sleep 0.3; chmod 755 @DIR@; touch @DIR@/db-ready; echo READY >&3; exec sleep 1000"]
        "#,
    );
    let s = wait_for("all ready", || {
        let s = status(&init.sock);
        s.all_ready.then_some(s)
    });
    assert_eq!(
        s.services
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>(),
        ["db", "web"]
    );
    assert!(s
        .services
        .iter()
        .all(|x| x.state == ServiceState::Ready && x.pid.is_some()));
    let web = logs(&init.sock, "web");
    assert!(
        web.iter()
            .any(|l| l == "web sees web in /tmp as 65534 with A=b c"),
        "{web:?}"
    );
    // web started only after db said it was ready (db marks that just before).
    assert!(web.iter().any(|l| l == "db was ready"), "{web:?}");
    let db = logs(&init.sock, "db");
    assert!(db.iter().any(|l| l == "starting db"), "{db:?}");
}

#[test]
fn restarts_a_crashed_service_and_keeps_its_log() {
    let init = start(
        r#"
        [[service]]
        name = "app"
        exec = ["/bin/sh", "-c", "echo run $$; echo READY >&3; exec sleep 1000"]
        backoff-initial = "50ms"
        "#,
    );
    let first = wait_for("app ready", || {
        svc(&status(&init.sock), "app")
            .pid
            .filter(|_| status(&init.sock).all_ready)
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = wait_for("app restarted", || {
        let s = status(&init.sock);
        let a = svc(&s, "app").clone();
        (a.restarts == 1 && a.state == ServiceState::Ready).then_some(a)
    });
    assert_ne!(s.pid, Some(first));
    assert_eq!(s.last_exit.as_deref(), Some("killed by SIGKILL"));
    let l = logs(&init.sock, "app");
    assert!(l.iter().any(|x| x == &format!("run {first}")), "{l:?}");
    assert!(
        l.iter().any(|x| x.contains("exited: killed by SIGKILL")),
        "{l:?}"
    );
}

#[test]
fn gives_up_after_the_limit_and_a_restart_request_revives() {
    let init = start(
        r#"
        [[service]]
        name = "bad"
        exec = ["/bin/sh", "-c", "echo failing; exit 3"]
        backoff-initial = "10ms"
        backoff-max = "40ms"
        give-up-after = 3
        "#,
    );
    let s = wait_for("give-up", || {
        let s = status(&init.sock);
        let b = svc(&s, "bad").clone();
        (b.state == ServiceState::Failed).then_some(b)
    });
    // Initial launch plus three retries.
    assert_eq!(s.restarts, 3);
    assert_eq!(s.last_exit.as_deref(), Some("exit status 3"));
    assert_eq!(
        logs(&init.sock, "bad")
            .iter()
            .filter(|l| *l == "failing")
            .count(),
        4
    );
    // It stays given up.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(svc(&status(&init.sock), "bad").restarts, 3);
    assert_eq!(
        call(
            &init.sock,
            &Request::Restart {
                service: "bad".into()
            }
        )
        .unwrap(),
        Response::Accepted
    );
    wait_for("a fifth run", || {
        (logs(&init.sock, "bad")
            .iter()
            .filter(|l| *l == "failing")
            .count()
            >= 5)
            .then_some(())
    });
}

#[test]
fn bad_requests_get_clear_errors() {
    let init = start("");
    let r = call(
        &init.sock,
        &Request::Logs {
            service: "ghost".into(),
            lines: None,
        },
    )
    .unwrap();
    assert_eq!(
        r,
        Response::Error {
            message: "no service named \"ghost\"".into()
        }
    );
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&init.sock).unwrap();
    s.write_all(b"{\"op\":\"format\"}\nnot json\n").unwrap();
    let mut r = std::io::BufReader::new(s);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(
            line.contains("\"result\":\"error\"") && line.contains("bad request"),
            "{line}"
        );
    }
}

#[test]
fn update_led_requests_are_accepted_and_no_boot_commit_is_reported_outside_a_box() {
    use cloudlet_proto::control::UpdateLed;
    let init = start(
        r#"
        [[service]]
        name = "a"
        exec = ["/bin/sh", "-c", "exec sleep 1000"]
        ready = "started"
        "#,
    );
    for state in [
        UpdateLed::Installing,
        UpdateLed::RolledBack,
        UpdateLed::Idle,
    ] {
        assert_eq!(
            call(&init.sock, &Request::Update { state }).unwrap(),
            Response::Accepted,
            "{state:?}"
        );
    }
    let s = wait_for("all ready", || {
        let s = status(&init.sock);
        s.all_ready.then_some(s)
    });
    // No boot state to commit without --system.
    assert_eq!(s.boot_commit, None);
}

#[test]
fn sigterm_stops_services_in_reverse_order_and_reaps_orphans() {
    // Each service notes in @DIR@/stops when it gets SIGTERM; `top` takes a
    // moment to stop and notes when it is done, so `base` (which `top` needs)
    // must not get its SIGTERM until after that.
    let mut init = start(
        r#"
        [[service]]
        name = "base"
        exec = ["/bin/sh", "-c", "trap 'echo base got TERM >> @DIR@/stops; exit 0' TERM; echo READY >&3; while :; do sleep 0.05; done"]
        [[service]]
        name = "top"
        after = ["base"]
        exec = ["/bin/sh", "-c", "(sleep 0.2 &); trap 'echo top got TERM >> @DIR@/stops; sleep 0.3; echo top stopped >> @DIR@/stops; exit 0' TERM; echo READY >&3; while :; do sleep 0.05; done"]
        [[service]]
        name = "stubborn"
        exec = ["/bin/sh", "-c", "trap '' TERM; echo READY >&3; while :; do sleep 0.05; done"]
        stop-timeout = "300ms"
        "#,
    );
    wait_for("all ready", || status(&init.sock).all_ready.then_some(()));
    // The orphaned `sleep 0.2` (its parent subshell exited at once) is reaped by init.
    std::thread::sleep(Duration::from_millis(500));
    let init_pid = init.child.id();
    let zombies = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            let rest = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.first() == Some(&"Z") && f.get(1) == Some(&init_pid.to_string().as_str())
        })
        .count();
    assert_eq!(zombies, 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_for("init exit", || init.child.try_wait().unwrap());
    assert!(status.success());
    // Dependents first: base is signalled only once top has exited.
    let stops = std::fs::read_to_string(init._dir.path().join("stops")).unwrap();
    assert_eq!(
        stops.lines().collect::<Vec<_>>(),
        ["top got TERM", "top stopped", "base got TERM"],
        "{stops}"
    );
}
