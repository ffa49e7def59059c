//! The engine's host-wide settings, durable under
//! `<state-dir>/policy/settings.json` (written atomically with fsync, like
//! VM definitions, so an acknowledged PUT survives a `kill -9`).

use std::path::PathBuf;

use kiln_api::engine::PolicySettings;

use crate::store::{Store, StoreError};

const NAME: &str = "settings";

pub struct SettingsFile {
    store: Store,
}

impl SettingsFile {
    /// Opens `<dir>/settings.json` (the directory is created).
    pub fn open(dir: PathBuf) -> Result<SettingsFile, StoreError> {
        Ok(SettingsFile {
            store: Store::open(dir)?,
        })
    }

    /// The stored settings, or the defaults (every lever off) when none
    /// were ever stored.
    pub fn load(&self) -> Result<PolicySettings, StoreError> {
        Ok(self.store.get(NAME)?.unwrap_or_default())
    }

    /// Durable when this returns.
    pub fn save(&self, settings: &PolicySettings) -> Result<(), StoreError> {
        self.store.put(NAME, settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::engine::LeverMode;

    #[test]
    fn settings_round_trip_and_default_to_all_off() {
        let dir = tempfile::tempdir().unwrap();
        let f = SettingsFile::open(dir.path().join("policy")).unwrap();
        let s = f.load().unwrap();
        assert_eq!(s, PolicySettings::default());
        assert_eq!(s.levers.balloon, LeverMode::Off);
        let mut s = s;
        s.levers.vcpu = LeverMode::Active;
        s.interval_ms = 250;
        f.save(&s).unwrap();
        let again = SettingsFile::open(dir.path().join("policy")).unwrap();
        assert_eq!(again.load().unwrap(), s);
        std::fs::write(dir.path().join("policy/settings.json"), b"{\"levrs\":1}").unwrap();
        let err = again.load().unwrap_err();
        assert!(err.to_string().contains("settings.json"), "{err}");
    }
}
