//! The on-disk metadata decoders (superblock copies, activity-log slots,
//! bitmap pages): a damaged disk gives an error or a conservative value,
//! never a panic; whatever decodes encodes again.
#![no_main]

use blkrep::meta::activity_log::{AL_SLOT_BYTES, AlSnapshot};
use blkrep::meta::bitmap::Bitmap;
use blkrep::meta::superblock::{SUPERBLOCK_BYTES, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut sb = data.to_vec();
    sb.resize(SUPERBLOCK_BYTES, 0);
    if let Ok(decoded) = Superblock::decode(&sb) {
        assert!(decoded.encode().is_ok(), "a decoded superblock encodes");
    }
    let mut al = data.to_vec();
    al.resize(AL_SLOT_BYTES, 0);
    if let Ok(Some(snap)) = AlSnapshot::decode(&al) {
        assert!(snap.encode().is_ok(), "a decoded activity log encodes");
    }
    let mut bitmap = Bitmap::new(3 << 30, 65536);
    let damaged = bitmap.load(data);
    assert!(damaged.len() <= bitmap.pages() as usize);
    assert!(bitmap.set_count() <= bitmap.chunks());
});
