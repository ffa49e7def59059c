//! What a disk is made of, as the user gives it: `--disk path=disk.img,readonly=on,serial=abc`.

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::virtio::options::{from_options, OptionsError};

/// Longest `serial` the guest can read back (`VIRTIO_BLK_T_GET_ID` answers
/// with a 20-byte field, NUL-padded).
pub const SERIAL_LEN: usize = 20;

/// One virtio-blk disk backed by a raw image file or a block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The raw image (a regular file or a host block device).
    #[serde(deserialize_with = "crate::virtio::options::non_empty_path")]
    pub path: PathBuf,
    /// Open the image read-only and offer `VIRTIO_BLK_F_RO`; the guest's
    /// writes fail and never reach the file.
    #[serde(default, alias = "readonly")]
    pub read_only: bool,
    /// The disk's serial number (at most 20 bytes), e.g. for
    /// `/dev/disk/by-id/virtio-<serial>` in the guest.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "short_serial"
    )]
    pub serial: Option<String>,
    /// Device name for logs and the worker thread: `disk0`, `disk1`, ...
    /// Empty until the VMM assigns one (the VM config does, in one place).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
}

fn default_id() -> String {
    "disk0".to_string()
}

fn short_serial<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let serial = Option::<String>::deserialize(d)?;
    match &serial {
        Some(s) if s.len() > SERIAL_LEN => Err(serde::de::Error::custom(format!(
            "longer than {SERIAL_LEN} bytes"
        ))),
        _ => Ok(serial),
    }
}

impl BlockConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            id: default_id(),
        }
    }

    /// Checks what parsing cannot (a config may also come from JSON).
    pub fn validate(&self) -> Result<(), BlockError> {
        if let Some(serial) = &self.serial {
            if serial.len() > SERIAL_LEN {
                return Err(BlockError::SerialTooLong(serial.clone()));
            }
        }
        if self.id.is_empty() {
            return Err(BlockError::EmptyId);
        }
        if self.path.as_os_str().is_empty() {
            return Err(BlockError::Options(OptionsError::Missing("path".into())));
        }
        Ok(())
    }

    /// The GET_ID answer: the serial, NUL-padded to 20 bytes.
    pub(crate) fn serial_bytes(&self) -> [u8; SERIAL_LEN] {
        let mut out = [0u8; SERIAL_LEN];
        if let Some(serial) = &self.serial {
            let n = serial.len().min(SERIAL_LEN);
            out[..n].copy_from_slice(&serial.as_bytes()[..n]);
        }
        out
    }
}

impl FromStr for BlockConfig {
    type Err = OptionsError;

    /// `path=disk.img[,readonly=on][,serial=abc][,id=disk1]`.
    fn from_str(text: &str) -> Result<Self, OptionsError> {
        from_options(text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk options: {0}")]
    Options(#[from] OptionsError),
    #[error("disk serial {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("disk id must not be empty")]
    EmptyId,
    #[error("cannot open disk image {path}: {source}{hint}", path = .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
        /// Extra advice appended to the message (may be empty).
        hint: &'static str,
    },
    #[error("disk image {} is a directory, not an image file", .0.display())]
    IsDirectory(PathBuf),
    #[error("disk image {} is neither a regular file nor a block device", .0.display())]
    NotAFile(PathBuf),
    #[error("cannot find the size of disk image {path}: {source}", path = .path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the disk's worker control: {0}")]
    Control(#[source] io::Error),
}
