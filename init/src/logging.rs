//! Log output. As PID 1, lines go to the console (the serial port) and to the
//! kernel log (/dev/kmsg, with the kernel's timestamps); elsewhere to stderr.

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;

/// Time since boot, as the kernel prints it.
struct BootTime;

impl FormatTime for BootTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let t = crate::system::uptime();
        write!(w, "[{:5}.{:03}]", t.as_secs(), t.subsec_millis())
    }
}

/// The serial console is slow under emulation and can stall on real
/// hardware (flow control): PID 1 never writes to it directly. Lines go
/// through a bounded queue to a writer thread; when the queue is full, lines
/// are dropped for the console only (they are still in the kernel log).
struct ConsoleQueue {
    tx: SyncSender<Vec<u8>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
}

static CONSOLE: OnceLock<ConsoleQueue> = OnceLock::new();

fn console_queue() -> Option<&'static ConsoleQueue> {
    if let Some(q) = CONSOLE.get() {
        return Some(q);
    }
    let mut console = File::options().write(true).open("/dev/console").ok()?;
    let (tx, rx) = sync_channel::<Vec<u8>>(256);
    let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
    let p2 = pending.clone();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            while let Ok(line) = rx.recv() {
                let _ = console.write_all(&line);
                let (n, cv) = &*p2;
                if let Ok(mut n) = n.lock() {
                    *n = n.saturating_sub(1);
                    cv.notify_all();
                }
            }
        })
        .ok()?;
    let _ = CONSOLE.set(ConsoleQueue { tx, pending });
    CONSOLE.get()
}

/// Waits (up to `timeout`) until every queued console line is written; called
/// before power-off so the last words reach the console.
pub fn flush(timeout: Duration) {
    let Some(q) = CONSOLE.get() else { return };
    let (n, cv) = &*q.pending;
    if let Ok(guard) = n.lock() {
        let _ = cv.wait_timeout_while(guard, timeout, |n| *n > 0);
    }
}

#[derive(Clone)]
struct ConsoleAndKmsg {
    kmsg: Arc<Mutex<Option<File>>>,
}

struct EventWriter(ConsoleAndKmsg);

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(q) = console_queue() {
            if let Ok(mut n) = q.pending.0.lock() {
                if q.tx.try_send(buf.to_vec()).is_ok() {
                    *n = n.saturating_add(1);
                }
            }
        }
        if let Ok(mut k) = self.0.kmsg.lock() {
            if let Some(f) = k.as_mut() {
                // One write is one kernel log record.
                let mut rec = b"<6>cloudlet-init: ".to_vec();
                rec.extend_from_slice(buf);
                let _ = f.write(&rec);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for ConsoleAndKmsg {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter(self.clone())
    }
}

fn filter(default: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
}

/// Logging for PID 1. Call after /dev is mounted (stage 1 does, stage 2 re-checks).
pub fn init_system() {
    let open = |p: &str| File::options().write(true).open(p).ok();
    let w = ConsoleAndKmsg {
        kmsg: Arc::new(Mutex::new(open("/dev/kmsg"))),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter("info"))
        .with_timer(BootTime)
        .with_target(false)
        .with_ansi(false)
        .with_writer(w)
        .try_init();
}

/// Logging for the unprivileged mode.
pub fn init_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter("info"))
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
