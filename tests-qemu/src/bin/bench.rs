//! `cloudlet-bench boot`: how fast and how small the booted box is, against
//! the same kernel and U-Boot booting a trivial init (the floor), measured in
//! the same run. Run through `scripts/bench boot`, which builds what it needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cloudlet_tests_qemu::{out_dir, root, BootOptions, Disk, Vm};

const RUNS: usize = 3;

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?}: {st}");
    }
    Ok(())
}

/// A raw disk with one FAT partition: the kernel, an initramfs holding only
/// the floor init, and a plain boot script.
fn floor_disk(work: &Path, idle: bool) -> Result<PathBuf> {
    let out = out_dir();
    let work = work.join(if idle { "idle" } else { "boot" });
    let work = work.as_path();
    let ir = work.join("floor-initramfs");
    std::fs::create_dir_all(ir.join("dev"))?;
    run(Command::new("aarch64-linux-gnu-gcc")
        .args(if idle { vec!["-DFLOOR_IDLE"] } else { vec![] })
        .args(["-static", "-O2", "-o"])
        .arg(ir.join("init"))
        .arg(root().join("tests-qemu/floor/init.c")))?;
    run(Command::new("mknod")
        .arg(ir.join("dev/console"))
        .args(["c", "5", "1"]))?;
    let initrd = work.join("floor-initrd");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet -R 0:0 > {}",
        ir.display(),
        initrd.display()
    )))?;
    let scr = work.join("boot.scr");
    run(Command::new("mkimage")
        .args(["-A", "arm64", "-T", "script", "-C", "none", "-d"])
        .arg(root().join("tests-qemu/floor/boot.cmd"))
        .arg(&scr)
        .stdout(std::process::Stdio::null()))?;
    let disk = work.join("floor.img");
    let f = std::fs::File::create(&disk)?;
    f.set_len(128 << 20)?;
    drop(f);
    run(Command::new("sh").arg("-c").arg(format!(
        "printf 'label: dos\\nstart=2048, type=c, bootable\\n' | sfdisk -q {}",
        disk.display()
    )))?;
    let part = format!("{}@@1M", disk.display());
    run(Command::new("mformat").args(["-i", &part, "-F", "::"]))?;
    for (src, name) in [
        (out.join("Image"), "Image"),
        (initrd, "initrd"),
        (scr, "boot.scr"),
    ] {
        run(Command::new("mcopy")
            .args(["-i", &part])
            .arg(&src)
            .arg(format!("::{name}")))?;
    }
    Ok(disk)
}

/// Guest uptime printed in a console line after `prefix`, e.g. "(uptime 4.301 s)".
fn uptime_after(console: &str, needle: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(needle))?;
    let tail = line.split("uptime ").nth(1)?;
    tail.split(|c: char| c != '.' && !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct CloudletBoot {
    wall: f64,
    guest_ready: f64,
    guest_init: f64,
    guest_stage1: f64,
}

fn boot_cloudlet(disk: &Disk) -> Result<(CloudletBoot, Vm)> {
    let mut vm = Vm::boot(disk, &BootOptions::default())?;
    let wall = vm.wait_ready()?.as_secs_f64();
    let c = vm.console();
    let b = CloudletBoot {
        wall,
        guest_ready: uptime_after(&c, "all services ready")
            .ok_or_else(|| anyhow!("no ready uptime"))?,
        guest_init: uptime_after(&c, "cloudlet-init starting")
            .ok_or_else(|| anyhow!("no init uptime"))?,
        guest_stage1: uptime_after(&c, "stage 1 (initramfs)")
            .ok_or_else(|| anyhow!("no stage 1 uptime"))?,
    };
    Ok((b, vm))
}

fn shutdown(mut vm: Vm) -> Result<()> {
    vm.power_button()?;
    vm.wait_exit(Duration::from_secs(120))?;
    Ok(())
}

fn size(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => format!("{:.1} MiB", m.len() as f64 / (1 << 20) as f64),
        Err(_) => "-".into(),
    }
}

fn boot_bench() -> Result<()> {
    let work = tempfile::tempdir()?;
    let floor = floor_disk(work.path(), false)?;
    let floor_qcow = Disk::new("1G")?; // only for its temp dir
    let mut floor_wall = Vec::new();
    let mut floor_guest = Vec::new();
    let mut cl_wall = Vec::new();
    let mut cl_guest = Vec::new();
    let mut cl_init_to_ready = Vec::new();
    let mut cl_stage1 = Vec::new();

    // First boot of a fresh card: grows /data to 1 GiB.
    let disk = Disk::new("1G")?;
    let (first, vm) = boot_cloudlet(&disk)?;
    shutdown(vm)?;

    let mut idle = None;
    for i in 0..RUNS {
        // Floor: same U-Boot, same kernel, trivial init.
        let fd = Disk {
            dir: tempfile::tempdir_in(floor_qcow.dir.path())?,
            path: floor.clone(),
        };
        let mut vm = boot_raw(&fd)?;
        let wall = vm
            .wait_console("FLOOR READY", Duration::from_secs(120))?
            .as_secs_f64();
        let guest =
            uptime_after(&vm.console(), "FLOOR READY").ok_or_else(|| anyhow!("no floor uptime"))?;
        vm.wait_exit(Duration::from_secs(60))?;
        floor_wall.push(wall);
        floor_guest.push(guest);

        let (b, mut vm) = boot_cloudlet(&disk)?;
        cl_wall.push(b.wall);
        cl_guest.push(b.guest_ready);
        cl_init_to_ready.push(b.guest_ready - b.guest_init);
        cl_stage1.push(b.guest_stage1);
        if i == RUNS - 1 {
            // Let the boot settle (commit, DHCP) before reading memory.
            vm.wait_console("boot marked good", Duration::from_secs(120))?;
            std::thread::sleep(Duration::from_secs(2));
            let s = vm.status()?;
            let ps = vm.sh("for p in /proc/[0-9]*; do [ -r $p/status ] && awk '/^VmRSS/{s+=$2} END{if(s) print s}' $p/status; done | awk '{t+=$1} END{print t}'")?;
            let all: Option<u64> = ps.trim().parse().ok();
            idle = Some((s, all));
        }
        shutdown(vm)?;
    }
    let (status, all_rss) = idle.ok_or_else(|| anyhow!("no idle sample"))?;
    // A figure that could not be read says so; it is never printed as 0.
    let init_rss = status.init_rss_kib;
    let svc: Vec<Option<u64>> = status
        .services
        .iter()
        .filter(|s| ["storage", "sync", "sharing", "updater"].contains(&s.name.as_str()))
        .map(|s| s.rss_kib)
        .collect();
    let svc_rss: Option<u64> = if svc.len() == 4 {
        svc.into_iter().sum()
    } else {
        None
    };
    let kib = |v: Option<u64>| v.map_or("not measured".to_owned(), |v| format!("{v} KiB"));

    let (fw, fg) = (median(floor_wall), median(floor_guest));
    let (cw, cg) = (median(cl_wall), median(cl_guest));
    let out = out_dir();
    let kernel = std::fs::read_to_string(out.join("kernel-release")).unwrap_or_default();
    println!();
    println!("Boot: QEMU aarch64 virt (TCG), cortex-a72, 512 MiB, U-Boot + Debian kernel {}; median of {RUNS}", kernel.trim());
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "", "floor", "cloudlet", "ratio"
    );
    println!(
        "{:<44} {:>10.2} s {:>10.2} s {:>7.2}x",
        "QEMU start -> ready (wall)",
        fw,
        cw,
        cw / fw
    );
    println!(
        "{:<44} {:>10.2} s {:>10.2} s {:>7.2}x",
        "guest uptime at ready",
        fg,
        cg,
        cg / fg
    );
    println!(
        "{:<44} {:>12} {:>10.3} s",
        "  stage 1 (initramfs) start, guest uptime",
        "-",
        median(cl_stage1)
    );
    println!(
        "{:<44} {:>12} {:>10.3} s",
        "  init start -> all services ready, guest",
        "-",
        median(cl_init_to_ready)
    );
    println!(
        "{:<44} {:>12} {:>10.2} s",
        "first boot of a fresh 1 GiB card (wall)", "-", first.wall
    );
    println!(
        "{:<44} {:>12} {:>10.3} s",
        "  of which init start -> ready, guest",
        "-",
        first.guest_ready - first.guest_init
    );
    println!();
    println!("Memory at idle (after ready)");
    println!("{:<44} {:>14}", "PID 1 (cloudlet-init) RSS", kib(init_rss));
    println!(
        "{:<44} {:>14}",
        "Cloudlet processes (init + 4 services) RSS",
        kib(init_rss.zip(svc_rss).map(|(a, b)| a + b))
    );
    println!(
        "{:<44} {:>14}",
        "every process on the box RSS",
        kib(all_rss)
    );
    println!();
    println!("Sizes");
    println!(
        "{:<44} {:>14}",
        "disk image (sparse, apparent)",
        size(&out.join("cloudlet-qemu-aarch64.img"))
    );
    println!(
        "{:<44} {:>14}",
        "rootfs (squashfs lz4, userland)",
        size(&out.join("rootfs.squashfs"))
    );
    println!(
        "{:<44} {:>14}",
        "initramfs (stage 1 + modules)",
        size(&out.join("initrd"))
    );
    for b in ["cloudlet-init", "cloudletd", "cloudlet"] {
        println!(
            "{:<44} {:>14}",
            format!("  {b} (static, stripped)"),
            size(&out.join("bin").join(b))
        );
    }
    Ok(())
}

/// Boots a raw disk image directly (for the floor).
fn boot_raw(d: &Disk) -> Result<Vm> {
    let qcow = d.dir.path().join("floor.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&d.path)
        .arg(&qcow))?;
    let disk = Disk {
        dir: tempfile::tempdir_in(d.dir.path())?,
        path: qcow,
    };
    Vm::boot(&disk, &BootOptions::default())
}

/// (utime + stime) of a host process, in clock ticks.
fn host_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is 0, utime is 11, stime is 12.
    let t = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no CPU time field {i}"))
    };
    Ok(t(11)? + t(12)?)
}

/// One sample of every process on the box: pid -> (name, context switches, CPU ticks).
fn guest_sample(vm: &mut Vm) -> Result<std::collections::BTreeMap<u32, (String, u64, u64)>> {
    let out = vm.sh(concat!(
        "for d in /proc/[0-9]*; do p=${d#/proc/}; ",
        // Every thread of the process counts, not just the main one.
        "c=$(cat $d/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches|^nonvoluntary_ctxt_switches/{s+=$2} END{print s}'); ",
        "t=$(awk '{print $14+$15}' $d/stat 2>/dev/null); ",
        "a=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null | cut -c1-40); ",
        "[ -n \"$c\" ] && [ -n \"$a\" ] && echo \"S $p $c $t $a\"; done"
    ))?;
    let mut m = std::collections::BTreeMap::new();
    for l in out.lines() {
        let mut f = l.split_whitespace();
        if f.next() != Some("S") {
            continue;
        }
        let (Some(pid), Some(cs), Some(t)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let name = f.collect::<Vec<_>>().join(" ");
        if let (Ok(pid), Ok(cs), Ok(t)) = (pid.parse(), cs.parse(), t.parse()) {
            m.insert(pid, (name, cs, t));
        }
    }
    Ok(m)
}

/// Time for the box to go quiet after the benchmark's own shell read its counters.
const SETTLE: Duration = Duration::from_secs(5);

fn idle_bench() -> Result<()> {
    let secs: u64 = std::env::var("CLOUDLET_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let window = Duration::from_secs(secs);
    let hz = 100.0; // USER_HZ on Linux, host and guest

    // Cloudlet, idle after boot.
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    vm.wait_console("boot marked good", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(5));
    // The guest's counters are read once before and once after; reading them
    // takes the box's shell a while (TCG), so the host's CPU window starts
    // only once that has settled and ends before the second reading: the
    // host figure measures the box, not the meter.
    let a = guest_sample(&mut vm)?;
    let a_at = Instant::now();
    std::thread::sleep(SETTLE);
    let h0 = host_cpu_ticks(vm.pid())?;
    std::thread::sleep(window);
    let h1 = host_cpu_ticks(vm.pid())?;
    let b = guest_sample(&mut vm)?;
    let guest_secs = a_at.elapsed().as_secs_f64();
    let cl_host = h1.saturating_sub(h0) as f64 / hz / secs as f64;
    shutdown(vm)?;

    // The floor: same kernel and U-Boot, an init that only sleeps.
    let work = tempfile::tempdir()?;
    let floor = floor_disk(work.path(), true)?;
    let fd = Disk {
        dir: tempfile::tempdir()?,
        path: floor,
    };
    let mut fvm = boot_raw(&fd)?;
    fvm.wait_console("FLOOR READY", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(5));
    let f0 = host_cpu_ticks(fvm.pid())?;
    std::thread::sleep(window);
    let f1 = host_cpu_ticks(fvm.pid())?;
    let floor_host = f1.saturating_sub(f0) as f64 / hz / secs as f64;
    fvm.pull_power()?;

    println!();
    println!("Idle: {secs} s after all services ready, QEMU aarch64 virt (TCG); wake-ups = context switches of all threads, over the {guest_secs:.0} s between the two readings");
    println!(
        "{:<42} {:>6} {:>12} {:>10}",
        "process (guest)", "pid", "wakeups/s", "CPU ms"
    );
    let mut worst: f64 = 0.0;
    for (pid, (name, cs1, t1)) in &b {
        let Some((_, cs0, t0)) = a.get(pid) else {
            continue;
        };
        let cloudlet = *pid == 1 || name.contains("cloudletd") || name.contains("udhcpc");
        let sampler = name.contains("/bin/sh") || name.contains("cttyhack");
        if !cloudlet && !sampler {
            continue;
        }
        let w = cs1.saturating_sub(*cs0) as f64 / guest_secs;
        let label = if sampler {
            format!("{name} (the benchmark's own shell)")
        } else {
            name.clone()
        };
        if cloudlet {
            worst = worst.max(w);
        }
        println!(
            "{:<42} {:>6} {:>12.3} {:>10}",
            label,
            pid,
            w,
            (t1.saturating_sub(*t0)) * 10
        );
    }
    println!(
        "{:<42} {:>6} {:>12.3}",
        "busiest Cloudlet process", "", worst
    );
    println!();
    println!(
        "{:<42} {:>12} {:>12} {:>8}",
        "host CPU used by QEMU (cores)", "floor", "cloudlet", "ratio"
    );
    println!(
        "{:<42} {:>12.3} {:>12.3} {:>7.2}x",
        "",
        floor_host,
        cl_host,
        if floor_host > 0.0 {
            cl_host / floor_host
        } else {
            f64::NAN
        }
    );
    Ok(())
}

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("boot") => boot_bench(),
        Some("idle") => idle_bench(),
        _ => bail!("usage: cloudlet-bench boot|idle"),
    }
}
