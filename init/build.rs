//! Records when the image was built, as `BUILD_EPOCH` (seconds since 1970) in
//! `$OUT_DIR/build_epoch.rs`. init never sets the clock to a time before it,
//! and treats a clock that reads earlier as not set (see `src/system/clock.rs`).
//!
//! The newest of what is known:
//! * `SOURCE_DATE_EPOCH` when the build sets it (reproducible builds; the
//!   Buildroot tree with `BR2_REPRODUCIBLE`). It is then the whole answer:
//!   the build machine's clock is not looked at.
//! * otherwise the build machine's clock when this script runs. Cargo reruns
//!   the script only when it or `SOURCE_DATE_EPOCH` changes, so a reused
//!   target directory keeps the time of its first build: older, so still a
//!   true lower bound.
//! * never earlier than [`FLOOR`], a date this source is known to be newer than.

use std::time::{SystemTime, UNIX_EPOCH};

/// 2026-01-01T00:00:00Z: this code was written after it.
const FLOOR: u64 = 1_767_225_600;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let known = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(secs) => secs,
            Err(e) => fail(&format!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds: {e}"
            )),
        },
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(FLOOR),
    };
    let epoch = known.max(FLOOR);
    let Some(out) = std::env::var_os("OUT_DIR") else {
        fail("cargo did not set OUT_DIR");
    };
    let path = std::path::Path::new(&out).join("build_epoch.rs");
    let text = format!(
        "/// When this image was built, in seconds since 1970 (see build.rs).\n\
         pub const BUILD_EPOCH: u64 = {epoch};\n"
    );
    if let Err(e) = std::fs::write(&path, text) {
        fail(&format!("writing {}: {e}", path.display()));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("cloudlet-init build script: {msg}");
    std::process::exit(1)
}
