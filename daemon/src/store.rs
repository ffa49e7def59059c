//! VM definitions on disk: one JSON file per VM under `<state-dir>/vms/`,
//! each written atomically (temporary file, fsync, rename, fsync of the
//! directory) so that an acknowledged definition survives a `kill -9` of the
//! daemon (or a power cut) at any moment, and a half-written one never
//! replaces a good one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: not a valid definition: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { op, path, source }
}

/// A directory of `NAME.json` files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the directory, and removes temporary files that a
    /// killed daemon left behind.
    pub fn open(dir: PathBuf) -> Result<Store, StoreError> {
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let path = entry.map_err(io_err("read", &dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(Store { dir })
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Writes `value` as `name`'s definition; durable when this returns.
    pub fn put<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let path = self.path_of(name);
        let tmp = self.dir.join(format!("{name}.json.tmp"));
        let text = serde_json::to_vec_pretty(value).expect("definitions serialize");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(&text).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        self.sync_dir()
    }

    /// Removes `name`'s definition; durable when this returns.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// `name`'s value, or None when it has none.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.path_of(name);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { path, source })
    }

    /// Every definition, sorted by name.
    pub fn load_all<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let mut items = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("read", &self.dir))? {
            let path = entry.map_err(io_err("read", &self.dir))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let text = fs::read(&path).map_err(io_err("read", &path))?;
            let value = serde_json::from_slice(&text).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
            items.push((name.to_owned(), value));
        }
        items.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(items)
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_load_remove_round_trip_and_stale_temporaries_go() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        fs::create_dir_all(&vms).unwrap();
        fs::write(vms.join("half.json.tmp"), b"{\"trunc").unwrap();
        let store = Store::open(vms.clone()).unwrap();
        assert!(!vms.join("half.json.tmp").exists());
        store.put("b", &serde_json::json!({"x": 2})).unwrap();
        store.put("a", &serde_json::json!({"x": 1})).unwrap();
        store.put("a", &serde_json::json!({"x": 3})).unwrap();
        let all: Vec<(String, serde_json::Value)> = store.load_all().unwrap();
        assert_eq!(
            all,
            vec![
                ("a".into(), serde_json::json!({"x": 3})),
                ("b".into(), serde_json::json!({"x": 2}))
            ]
        );
        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load_all::<serde_json::Value>().unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_definition_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("bad.json"), b"not json").unwrap();
        let store = Store::open(dir.path().to_owned()).unwrap();
        let err = store.load_all::<serde_json::Value>().unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }
}
