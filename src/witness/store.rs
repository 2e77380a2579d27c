//! The witness's durable records: one small file per volume in the state
//! directory, written to a temporary file, fsynced, renamed over the old one
//! and the directory fsynced, so a crash leaves either the old or the new
//! record, never a torn one. The content is a checksummed frame.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::protocol;
use crate::quorum::Record;

const SUFFIX: &str = ".record";

/// Record store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or a file cannot be read or written.
    #[error("witness state {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A record file is damaged.
    #[error(
        "witness record {path} is damaged ({problem}); remove it to let the witness learn the record again from both nodes"
    )]
    Corrupt {
        /// Path.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

/// The directory of record files.
pub struct RecordStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl RecordStore {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(RecordStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Reads every record; any damaged file is an error (never a guess).
    pub fn load(&self) -> Result<BTreeMap<String, Record>, StoreError> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(key) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            let path = entry.path();
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let record = decode_record(&bytes, &path)?;
            out.insert(key.to_string(), record);
        }
        Ok(out)
    }

    /// Reads the record stored under `key`, if any.
    pub fn load_one(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let path = self.dir.join(format!("{key}{SUFFIX}"));
        match std::fs::read(&path) {
            Ok(bytes) => decode_record(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Durably replaces the record stored under `key`.
    pub fn save(&self, key: &str, record: &Record) -> Result<(), StoreError> {
        let path = self.dir.join(format!("{key}{SUFFIX}"));
        let tmp = self.dir.join(format!("{key}{SUFFIX}.tmp"));
        let frame = protocol::encode(record).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            problem: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&frame).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }
}

/// A stored record, checked like anything else from outside.
fn decode_record(bytes: &[u8], path: &Path) -> Result<Record, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        path: path.display().to_string(),
        problem,
    };
    let record: Record = protocol::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if record.epoch > crate::quorum::record::EPOCH_MAX {
        return Err(corrupt(format!(
            "epoch {} is beyond any the witness hands out",
            record.epoch
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_refuses_damage() {
        let dir = std::env::temp_dir().join(format!("blkrep-wstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = RecordStore::open(&dir).unwrap();
        let r = Record {
            epoch: 9,
            primary: Some("a".into()),
            up_to_date: ["a".to_string()].into_iter().collect(),
            forced: true,
        };
        s.save("v@a+b", &r).unwrap();
        s.save("v@a+b", &r).unwrap();
        assert_eq!(s.load().unwrap().get("v@a+b"), Some(&r));
        let path = dir.join("v@a+b.record");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("remove it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
