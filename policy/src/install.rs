//! Where an installed Kiln keeps its models and ONNX Runtime, and the search
//! every front end (`kiln policy ...`, `kiln serve`, `kiln-policy`) uses to
//! find them, so users never depend on the source tree.
//!
//! The layout under a prefix (`scripts/install.sh --prefix P`, default
//! /usr/local): `P/bin/kiln`, `P/bin/kiln-vmm`, [`MODELS_SUBDIR`] and
//! [`RUNTIME_SUBDIR`]. The source tree is searched last, for developers.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The models directory under an installation prefix.
pub const MODELS_SUBDIR: &str = "share/kiln/models";
/// The directory holding `libonnxruntime.so*` under an installation prefix.
pub const RUNTIME_SUBDIR: &str = "lib/kiln";
/// Overrides the models directory (after an explicit `--models`).
pub const MODELS_ENV: &str = "KILN_MODELS_DIR";
/// Names the ONNX Runtime library to load (the `ort` crate's own variable).
pub const RUNTIME_ENV: &str = "ORT_DYLIB_PATH";
/// The model files, one per lever.
pub const MODEL_NAMES: [&str; 3] = ["balloon", "cpu", "device"];

/// A directory or file that was found, and why it was the one chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub path: PathBuf,
    pub why: String,
}

/// Nothing was found; every place looked at, in order.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no {what} found; searched {}", searched_list(.searched))]
pub struct NotFound {
    pub what: &'static str,
    pub searched: Vec<String>,
}

fn searched_list(places: &[String]) -> String {
    places.join(", ")
}

/// The inputs of the search: what this process was told and where it runs.
/// Tests build one by hand; [`Places::this_process`] reads the real ones.
#[derive(Debug, Clone, Default)]
pub struct Places {
    /// `--models DIR` given on the command line.
    pub explicit_models: Option<PathBuf>,
    /// `$KILN_MODELS_DIR`.
    pub models_env: Option<OsString>,
    /// `$ORT_DYLIB_PATH`.
    pub runtime_env: Option<OsString>,
    /// The installation prefix of the running binary (`<exe dir>/..`).
    pub exe_prefix: Option<PathBuf>,
    /// System prefixes, searched after the binary's own.
    pub system_prefixes: Vec<PathBuf>,
    /// The source tree this crate was built from (developers only).
    pub source_tree: Option<PathBuf>,
}

impl Places {
    /// The real places of this process; `explicit_models` is `--models`.
    pub fn this_process(explicit_models: Option<&Path>) -> Places {
        let exe_prefix = std::env::current_exe()
            .ok()
            .map(|exe| std::fs::canonicalize(&exe).unwrap_or(exe))
            .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf));
        Places {
            explicit_models: explicit_models.map(Path::to_path_buf),
            models_env: std::env::var_os(MODELS_ENV).filter(|v| !v.is_empty()),
            runtime_env: std::env::var_os(RUNTIME_ENV).filter(|v| !v.is_empty()),
            exe_prefix,
            system_prefixes: vec!["/usr/local".into(), "/usr".into()],
            source_tree: Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(Path::to_path_buf),
        }
    }

    /// The installation prefixes in search order, each with its name.
    fn prefixes(&self) -> Vec<(PathBuf, String)> {
        let mut out: Vec<(PathBuf, String)> = Vec::new();
        if let Some(p) = &self.exe_prefix {
            out.push((p.clone(), "installed next to the running binary".into()));
        }
        for p in &self.system_prefixes {
            if !out.iter().any(|(q, _)| q == p) {
                out.push((p.clone(), format!("installed under {}", p.display())));
            }
        }
        out
    }

    /// The models directory: `--models`, then `$KILN_MODELS_DIR` (both taken
    /// as given, even when empty: the user chose them), then the first
    /// installed or source-tree directory that holds a model.
    pub fn models_dir(&self) -> Result<Found, NotFound> {
        if let Some(p) = &self.explicit_models {
            return Ok(Found {
                path: p.clone(),
                why: "given with --models".into(),
            });
        }
        if let Some(p) = &self.models_env {
            return Ok(Found {
                path: PathBuf::from(p),
                why: format!("from ${MODELS_ENV}"),
            });
        }
        let mut candidates: Vec<(PathBuf, String)> = self
            .prefixes()
            .into_iter()
            .map(|(p, why)| (p.join(MODELS_SUBDIR), why))
            .collect();
        if let Some(src) = &self.source_tree {
            candidates.push((
                src.join("policy/models"),
                "from the source tree: no installed models were found".into(),
            ));
        }
        let mut searched = vec![format!("--models, ${MODELS_ENV} (not set)")];
        for (dir, why) in candidates {
            if has_models(&dir) {
                return Ok(Found { path: dir, why });
            }
            searched.push(dir.display().to_string());
        }
        Err(NotFound {
            what: "policy models",
            searched,
        })
    }

    /// The ONNX Runtime library: `$ORT_DYLIB_PATH` as given, then
    /// `libonnxruntime.so*` in each prefix's [`RUNTIME_SUBDIR`], then the
    /// path `policy/training/setup.sh` recorded in the source tree's cache.
    pub fn runtime_library(&self) -> Result<Found, NotFound> {
        if let Some(p) = &self.runtime_env {
            return Ok(Found {
                path: PathBuf::from(p),
                why: format!("from ${RUNTIME_ENV}"),
            });
        }
        let mut searched = vec![format!("${RUNTIME_ENV} (not set)")];
        for (prefix, why) in self.prefixes() {
            let dir = prefix.join(RUNTIME_SUBDIR);
            if let Some(lib) = runtime_in(&dir) {
                return Ok(Found { path: lib, why });
            }
            searched.push(format!("{}/libonnxruntime.so*", dir.display()));
        }
        if let Some(src) = &self.source_tree {
            let record = src.join(".cache/kiln-policy-venv/ort_dylib_path");
            if let Ok(text) = std::fs::read_to_string(&record) {
                let lib = PathBuf::from(text.trim());
                if lib.is_file() {
                    return Ok(Found {
                        path: lib,
                        why: format!(
                            "recorded by policy/training/setup.sh in {}",
                            record.display()
                        ),
                    });
                }
            }
            searched.push(record.display().to_string());
        }
        Err(NotFound {
            what: "ONNX Runtime library",
            searched,
        })
    }
}

/// Whether `dir` holds at least one of the levers' models.
pub fn has_models(dir: &Path) -> bool {
    MODEL_NAMES
        .iter()
        .any(|n| dir.join(format!("{n}.onnx")).is_file())
}

/// `dir/libonnxruntime.so` if present, else the highest-named
/// `libonnxruntime.so.*` in `dir`.
fn runtime_in(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join("libonnxruntime.so");
    if plain.is_file() {
        return Some(plain);
    }
    let mut versioned: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .collect();
    versioned.sort();
    versioned.pop()
}

/// This process's models directory (see [`Places::models_dir`]).
pub fn models_dir(explicit: Option<&Path>) -> Result<Found, NotFound> {
    Places::this_process(explicit).models_dir()
}

/// This process's ONNX Runtime library (see [`Places::runtime_library`]).
pub fn runtime_library() -> Result<Found, NotFound> {
    Places::this_process(None).runtime_library()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    /// Three prefixes (the binary's, /usr/local-like, /usr-like) and a source
    /// tree, all under one temp dir, none populated.
    fn places(root: &Path) -> Places {
        Places {
            exe_prefix: Some(root.join("opt")),
            system_prefixes: vec![root.join("usr-local"), root.join("usr")],
            source_tree: Some(root.join("src")),
            ..Places::default()
        }
    }

    #[test]
    fn models_explicit_flag_beats_env_beats_installed() {
        let t = tempfile::tempdir().unwrap();
        let mut p = places(t.path());
        touch(&t.path().join("opt").join(MODELS_SUBDIR).join("cpu.onnx"));
        p.models_env = Some(t.path().join("from-env").into());
        p.explicit_models = Some(t.path().join("from-flag"));
        let f = p.models_dir().unwrap();
        assert_eq!(f.path, t.path().join("from-flag"));
        assert!(f.why.contains("--models"), "{f:?}");
        p.explicit_models = None;
        let f = p.models_dir().unwrap();
        assert_eq!(f.path, t.path().join("from-env"), "env even when empty");
        assert!(f.why.contains(MODELS_ENV), "{f:?}");
        p.models_env = None;
        let f = p.models_dir().unwrap();
        assert_eq!(f.path, t.path().join("opt").join(MODELS_SUBDIR));
        assert!(f.why.contains("running binary"), "{f:?}");
    }

    #[test]
    fn models_installed_beat_the_source_tree_in_order() {
        let t = tempfile::tempdir().unwrap();
        let p = places(t.path());
        touch(&t.path().join("src/policy/models/balloon.onnx"));
        assert_eq!(
            p.models_dir().unwrap().path,
            t.path().join("src/policy/models")
        );
        touch(&t.path().join("usr").join(MODELS_SUBDIR).join("device.onnx"));
        assert_eq!(
            p.models_dir().unwrap().path,
            t.path().join("usr").join(MODELS_SUBDIR)
        );
        touch(
            &t.path()
                .join("usr-local")
                .join(MODELS_SUBDIR)
                .join("cpu.onnx"),
        );
        let f = p.models_dir().unwrap();
        assert_eq!(f.path, t.path().join("usr-local").join(MODELS_SUBDIR));
        assert!(f.why.contains("usr-local"), "{f:?}");
        // A directory without a model file does not count.
        touch(&t.path().join("opt").join(MODELS_SUBDIR).join("README"));
        assert_eq!(
            p.models_dir().unwrap().path,
            t.path().join("usr-local").join(MODELS_SUBDIR)
        );
    }

    #[test]
    fn no_models_names_every_place_searched() {
        let t = tempfile::tempdir().unwrap();
        let e = places(t.path()).models_dir().unwrap_err();
        let msg = e.to_string();
        for dir in [
            t.path().join("opt").join(MODELS_SUBDIR),
            t.path().join("usr-local").join(MODELS_SUBDIR),
            t.path().join("usr").join(MODELS_SUBDIR),
            t.path().join("src/policy/models"),
        ] {
            assert!(msg.contains(&dir.display().to_string()), "{msg}");
        }
        assert!(msg.contains(MODELS_ENV), "{msg}");
    }

    #[test]
    fn runtime_env_beats_installed_beats_setup_record() {
        let t = tempfile::tempdir().unwrap();
        let mut p = places(t.path());
        let venv_lib = t.path().join("venv/libonnxruntime.so.1.31.1");
        touch(&venv_lib);
        let record = t.path().join("src/.cache/kiln-policy-venv/ort_dylib_path");
        touch(&record);
        std::fs::write(&record, format!("{}\n", venv_lib.display())).unwrap();
        let f = p.runtime_library().unwrap();
        assert_eq!(f.path, venv_lib);
        assert!(f.why.contains("setup.sh"), "{f:?}");

        let lib_dir = t.path().join("usr").join(RUNTIME_SUBDIR);
        touch(&lib_dir.join("libonnxruntime.so.1.9.0"));
        touch(&lib_dir.join("libonnxruntime.so.1.31.1"));
        assert_eq!(
            p.runtime_library().unwrap().path,
            lib_dir.join("libonnxruntime.so.1.9.0"),
            "without the unversioned name, the highest-named file (sorted by name)"
        );
        touch(&lib_dir.join("libonnxruntime.so"));
        assert_eq!(
            p.runtime_library().unwrap().path,
            lib_dir.join("libonnxruntime.so")
        );
        let exe_lib = t
            .path()
            .join("opt")
            .join(RUNTIME_SUBDIR)
            .join("libonnxruntime.so");
        touch(&exe_lib);
        assert_eq!(p.runtime_library().unwrap().path, exe_lib);

        p.runtime_env = Some("/elsewhere/libonnxruntime.so".into());
        let f = p.runtime_library().unwrap();
        assert_eq!(f.path, Path::new("/elsewhere/libonnxruntime.so"));
        assert!(f.why.contains(RUNTIME_ENV), "{f:?}");
    }

    #[test]
    fn no_runtime_names_every_place_searched() {
        let t = tempfile::tempdir().unwrap();
        let msg = places(t.path()).runtime_library().unwrap_err().to_string();
        for place in [
            t.path().join("opt").join(RUNTIME_SUBDIR),
            t.path().join("usr").join(RUNTIME_SUBDIR),
            t.path().join("src/.cache/kiln-policy-venv/ort_dylib_path"),
        ] {
            assert!(msg.contains(&place.display().to_string()), "{msg}");
        }
        assert!(msg.contains(RUNTIME_ENV), "{msg}");
    }
}
