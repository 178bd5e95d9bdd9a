//! The MBR readers init uses to find its disk and grow the data partition
//! on first boot. Input: the sector, then `grow_entry`'s arguments
//! (`cloudlet_fuzz::MbrInput`).
//!
//! Never panics; `mbr_signature` and `mbr_entry` read exactly the bytes the
//! MBR layout gives them; `grow_entry` either changes nothing or writes only
//! the entry's size field, growing it to a MiB boundary inside the disk, by
//! at least a MiB, and is then done (a second call changes nothing).
#![no_main]

use cloudlet_fuzz::MbrInput;
use cloudlet_init::system::disk::{grow_entry, mbr_entry, mbr_signature, MbrEntry};
use libfuzzer_sys::fuzz_target;

const ALIGN: u64 = 2048;

fn le32(b: &[u8]) -> u64 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
}

fuzz_target!(|data: &[u8]| {
    let MbrInput {
        mbr,
        n,
        disk_sectors,
    } = MbrInput::split(data);

    let expected_sig =
        (mbr.len() >= 512 && mbr[510..512] == [0x55, 0xAA]).then(|| le32(&mbr[440..444]) as u32);
    assert_eq!(mbr_signature(mbr), expected_sig);

    for k in [0, 1, 2, 3, 4, 5, n] {
        let off = (k as usize).checked_sub(1).map(|i| 446 + 16 * i);
        let expected = off.and_then(|o| mbr.get(o..o + 16)).map(|e| MbrEntry {
            kind: e[4],
            start: le32(&e[8..12]),
            sectors: le32(&e[12..16]),
        });
        assert_eq!(mbr_entry(mbr, k), expected, "entry {k}");
    }

    let mut grown = mbr.to_vec();
    let Some(e) = grow_entry(&mut grown, n, disk_sectors) else {
        assert_eq!(grown, mbr, "refused to grow, yet wrote");
        return;
    };
    let Some(old) = mbr_entry(mbr, n) else {
        panic!("grew entry {n}, which does not exist");
    };
    let size_at = 446 + 16 * (n as usize - 1) + 12;
    for (i, (a, b)) in mbr.iter().zip(&grown).enumerate() {
        assert!(
            a == b || (size_at..size_at + 4).contains(&i),
            "wrote byte {i}"
        );
    }
    assert_eq!(
        mbr_entry(&grown, n),
        Some(e),
        "returned entry is what was written"
    );
    assert_eq!((e.kind, e.start), (old.kind, old.start));
    assert!(
        old.kind != 0 && old.start != 0,
        "grew an empty entry {old:?}"
    );
    assert!(
        e.sectors >= old.sectors + ALIGN,
        "{old:?} -> {e:?}: under a MiB"
    );
    assert!(
        e.start + e.sectors <= disk_sectors,
        "{e:?} past {disk_sectors}"
    );
    assert!(
        (e.start + e.sectors) % ALIGN == 0 || e.sectors == u32::MAX as u64,
        "{e:?} does not end on a MiB"
    );
    assert_eq!(grow_entry(&mut grown, n, disk_sectors), None, "grew twice");
});
