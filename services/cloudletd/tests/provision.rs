//! Flash-time provisioning on the host: `cloudlet flash` writes a small
//! Cloudlet-shaped image; the files it put on the boot partition are placed
//! where init moves them (`<data>/sharing/provision/`, init's move is
//! tested in init/src/pid1/provision.rs and on the real image in
//! tests-qemu/tests/provision.rs); the sharing service imports them at
//! start. The PC then reaches the box over TLS with its device key and the
//! identity it pinned at flash time, with no button and no window.

mod common;

use common::{cloudlet, text, Sharing};
use std::path::Path;
use std::process::{Command, Output};

use cloudlet_runtime::tls;
use cloudlet_testkit::image;

const FILES: [&str; 4] = ["identity.key", "identity.crt", "owner.crt", "owner.name"];

/// What init does on first boot: the provision directory of the flashed
/// card, into the sharing service's state directory.
fn first_boot(card: &Path, data: &Path) {
    let dest = data.join("sharing/provision");
    std::fs::create_dir_all(&dest).unwrap();
    for name in FILES {
        let bytes = image::read_boot_file(card, &format!("cloudlet-provision/{name}"))
            .unwrap()
            .unwrap_or_else(|| panic!("{name} is on the card"));
        std::fs::write(dest.join(name), bytes).unwrap();
    }
}

fn box_id_of(cert_der: &[u8]) -> String {
    tls::box_id(&tls::spki_of(&cert_der.to_vec().into()).unwrap())
}

/// `cloudletd sharing ARGS` on the box whose data is `data`; its output.
fn sharing(data: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .arg("sharing")
        .args(args)
        .env("CLOUDLET_REGISTRY_SOCKET", data.join("registry.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

/// The registry's devices, as `cloudletd sharing devices` prints them (JSON).
fn devices(data: &Path) -> Vec<serde_json::Value> {
    let out = sharing(data, &["devices"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

#[test]
fn a_flashed_card_boots_as_the_box_flash_pinned_with_the_pc_as_owner_and_no_button() {
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("config");
    let img = d.path().join("cloudlet.img");
    image::cloudlet_image(&img, &[("boot.scr", b"script")], &[0u8; 4096]).unwrap();
    let card = d.path().join("card.img");
    let out = cloudlet(
        &config,
        &[
            "flash",
            img.to_str().unwrap(),
            card.to_str().unwrap(),
            "--name",
            "laptop",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let flashed_id = text(&out)
        .lines()
        .find_map(|l| l.strip_prefix("Box ID:").map(|s| s.trim().to_owned()))
        .unwrap_or_else(|| panic!("flash prints the box ID: {}", text(&out)));

    // Not reached yet: no address is known and nothing answers on the
    // LAN for it, so the client says how to give one.
    let out = cloudlet(&config, &["devices", "--box", &flashed_id]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("has no known address") && text(&out).contains("--host"),
        "{}",
        text(&out)
    );

    let data = d.path().join("data");
    first_boot(&card, &data);
    let s = Sharing::start(&data, "127.0.0.1:0", &[("CLOUDLET_MDNS", "off")]);
    let host = s.addr.to_string();

    assert_eq!(
        box_id_of(&s.identity()),
        flashed_id,
        "the box is the one flash made"
    );
    assert!(
        !data.join("sharing/provision").exists(),
        "the provision directory is gone once imported"
    );
    let all = devices(&data);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["role"], "owner");
    assert_eq!(all[0]["paired_how"], "flash");
    assert_eq!(all[0]["name"], "laptop");

    // The PC reaches it over TLS with the pinned identity and its own key.
    let out = cloudlet(&config, &["devices", "--box", &flashed_id, "--host", &host]);
    assert!(out.status.success(), "{}", text(&out));
    let line = text(&out)
        .lines()
        .find(|l| l.contains("(this device)"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(
        line.contains("owner") && line.contains("flash") && line.contains("laptop"),
        "{line}"
    );
    // The address is kept: the next call needs no --host.
    let out = cloudlet(&config, &["devices"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(this device)"), "{}", text(&out));

    // The public identity route names the same box, over TLS that the
    // flashed certificate alone verifies.
    let root = tls::from_pem(
        "CERTIFICATE",
        &String::from_utf8(
            image::read_boot_file(&card, "cloudlet-provision/identity.crt")
                .unwrap()
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.into()).unwrap();
    let tls_config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let r = cloudlet_testkit::http::request_tls(
        s.addr,
        &tls_config,
        &tls::box_dns_name(&flashed_id),
        "GET",
        "/api/identity",
        &[],
        cloudlet_testkit::http::Body::None,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["box_id"], flashed_id.as_str());

    // Restarting imports nothing twice.
    drop(s);
    let s = Sharing::start(&data, "127.0.0.1:0", &[("CLOUDLET_MDNS", "off")]);
    assert_eq!(box_id_of(&s.identity()), flashed_id);
    assert_eq!(devices(&data).len(), 1);

    // Another owner revokes the PC; then the same files come again, as
    // when init could not delete them from the card: the PC stays revoked.
    let pc = all[0]["id"].as_str().unwrap().to_owned();
    sharing(&data, &["add-device", "desktop", "owner"]);
    sharing(&data, &["revoke", &pc]);
    drop(s);
    first_boot(&card, &data);
    let s = Sharing::start(&data, "127.0.0.1:0", &[("CLOUDLET_MDNS", "off")]);
    assert_eq!(box_id_of(&s.identity()), flashed_id);
    let all = devices(&data);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["name"], "desktop");
    assert!(
        !data.join("sharing/provision").exists(),
        "the files copied again are discarded"
    );
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("imported already"), "{log}");
    let out = cloudlet(
        &config,
        &[
            "devices",
            "--box",
            &flashed_id,
            "--host",
            &s.addr.to_string(),
        ],
    );
    assert!(
        !out.status.success(),
        "the revoked PC is refused: {}",
        text(&out)
    );
}

#[test]
fn provisioned_files_that_cannot_be_read_are_discarded_and_the_service_starts() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let dir = data.join("sharing/provision");
    std::fs::create_dir_all(&dir).unwrap();
    let id = tls::IdentityKeys::generate().unwrap();
    let owner = tls::IdentityKeys::generate().unwrap();
    // A directory where the key should be: reading it fails at every start.
    std::fs::create_dir(dir.join("identity.key")).unwrap();
    std::fs::write(
        dir.join("identity.crt"),
        tls::pem("CERTIFICATE", &id.cert_der),
    )
    .unwrap();
    std::fs::write(
        dir.join("owner.crt"),
        tls::pem("CERTIFICATE", &owner.cert_der),
    )
    .unwrap();

    let s = Sharing::start(&data, "127.0.0.1:0", &[("CLOUDLET_MDNS", "off")]);
    assert_ne!(box_id_of(&s.identity()), id.box_id);
    assert!(devices(&data).is_empty(), "no owner was imported");
    assert!(!dir.exists(), "the files are discarded");
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("trying again would not help"), "{log}");
}

#[test]
fn a_provisioned_certificate_for_another_key_is_refused_and_nothing_is_imported() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let dir = data.join("sharing/provision");
    std::fs::create_dir_all(&dir).unwrap();
    let a = tls::IdentityKeys::generate().unwrap();
    let b = tls::IdentityKeys::generate().unwrap();
    let owner = tls::IdentityKeys::generate().unwrap();
    std::fs::write(
        dir.join("identity.key"),
        tls::pem("PRIVATE KEY", &a.key.serialize_der()),
    )
    .unwrap();
    std::fs::write(
        dir.join("identity.crt"),
        tls::pem("CERTIFICATE", &b.cert_der),
    )
    .unwrap();
    std::fs::write(
        dir.join("owner.crt"),
        tls::pem("CERTIFICATE", &owner.cert_der),
    )
    .unwrap();

    let s = Sharing::start(&data, "127.0.0.1:0", &[("CLOUDLET_MDNS", "off")]);
    let id = box_id_of(&s.identity());
    assert_ne!(id, a.box_id, "the provisioned key was not taken");
    assert_ne!(id, b.box_id);
    assert!(devices(&data).is_empty(), "no owner was imported");
    assert!(!dir.exists(), "the refused files are discarded");
    let log = s.log.lock().unwrap().join("\n");
    assert!(
        log.contains("identity.crt does not name the key in identity.key"),
        "{log}"
    );
}
