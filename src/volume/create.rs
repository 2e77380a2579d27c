//! `create-md`: writes fresh metadata for a volume on this node.

use std::path::Path;

use super::shell::open_meta;
use crate::config::MetaLocation;
use crate::meta::device::MetaDevice;
use crate::meta::{Bitmap, DiskState, Generations, MetaError, MetaLayout, Superblock};

/// Writes fresh metadata (disk state Inconsistent, no data generation) for
/// volume `name` on `disk`. Refuses to overwrite existing blkrep metadata or a
/// disk that carries a filesystem or volume signature unless `force`.
pub fn create_metadata(
    disk: &Path,
    meta: &MetaLocation,
    name: &str,
    chunk_bytes: u32,
    force: bool,
) -> Result<MetaLayout, MetaError> {
    let (dev, _) = open_meta(disk, meta, chunk_bytes)?;
    if !force {
        match dev.read_superblock() {
            Ok((sb, _)) => {
                return Err(MetaError::WouldOverwrite(format!(
                    "{} already holds blkrep metadata for volume {:?} ({:?})",
                    disk.display(),
                    sb.volume_name,
                    sb.disk_state
                )));
            }
            Err(MetaError::NoMetadata) => {}
            Err(MetaError::Io { path, source }) => return Err(MetaError::Io { path, source }),
            Err(other) => {
                return Err(MetaError::WouldOverwrite(format!(
                    "{} holds damaged blkrep metadata ({other})",
                    disk.display()
                )));
            }
        }
        if let Some(sig) = MetaDevice::data_signature(disk)? {
            return Err(MetaError::WouldOverwrite(format!(
                "{} looks in use: it contains {sig}",
                disk.display()
            )));
        }
    }
    let layout = *dev.layout();
    let sb = Superblock {
        seq: 1,
        volume_name: name.to_string(),
        data_bytes: layout.data_bytes,
        chunk_bytes,
        disk_state: DiskState::Inconsistent,
        generations: Generations::default(),
        attached: false,
        primary: false,
        record: crate::quorum::RecordView::default(),
        boot_id: [0; 16],
        cache_lost: false,
    };
    let bitmap = Bitmap::new(layout.data_bytes, u64::from(chunk_bytes));
    dev.format(&sb, &bitmap)?;
    Ok(layout)
}
