//! The ext4 superblock reader (init reads 1024 bytes at offset 1024 of the
//! data partition to decide between mount, fsck and mkfs).
//!
//! Never panics; reads nothing past the 1024-byte superblock; an accepted
//! superblock has a real block size and a consistent "clean" verdict.
#![no_main]

use cloudlet_init::system::ext4::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let got = parse(data);
    if data.len() > 1024 {
        assert_eq!(parse(&data[..1024]), got, "read past the superblock");
    }
    let Some(sb) = got else { return };
    assert!(
        sb.block_size.is_power_of_two() && (1024..=65536).contains(&sb.block_size),
        "block size {}",
        sb.block_size
    );
    if sb.clean {
        assert!(!sb.needs_recovery && !sb.has_errors, "{sb:?}");
    }
});
