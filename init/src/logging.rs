//! Log output. As PID 1, lines go to the console (the serial port) and to the
//! kernel log (/dev/kmsg, with the kernel's timestamps); elsewhere to stderr.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

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

#[derive(Clone)]
struct ConsoleAndKmsg {
    console: Arc<Mutex<Option<File>>>,
    kmsg: Arc<Mutex<Option<File>>>,
}

struct EventWriter(ConsoleAndKmsg);

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut c) = self.0.console.lock() {
            if let Some(f) = c.as_mut() {
                let _ = f.write_all(buf);
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
        console: Arc::new(Mutex::new(open("/dev/console"))),
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
