//! The shipped models as found where Kiln is installed: loading them for the
//! engine (every front end calls [`load_models`]) and listing them with their
//! name@version, file, size, features and whether they load
//! (`kiln policy models`).

use crate::engine::Models;
use crate::features::{BALLOON_FEATURES, CPU_FEATURES, DEVICE_FEATURES};
use crate::install::{self, Found, MODEL_NAMES};
use crate::model::{runtime, Model, Schema};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The features the engine computes for the model called `name`.
pub fn engine_features(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "balloon" => Some(&BALLOON_FEATURES),
        "cpu" => Some(&CPU_FEATURES),
        "device" => Some(&DEVICE_FEATURES),
        _ => None,
    }
}

/// Finds the models directory (`explicit` is `--models`) and loads what it
/// can; with none found it says where it looked, in one line, and the engine
/// runs the heuristic.
pub fn load_models(explicit: Option<&Path>) -> Models {
    match install::models_dir(explicit) {
        Ok(found) => {
            tracing::info!(
                "policy models from {} ({})",
                found.path.display(),
                found.why
            );
            Models::load_or_heuristic(&found.path)
        }
        Err(e) => {
            tracing::warn!("{e}; the policy engine runs the heuristic policy");
            eprintln!("kiln policy: {e}; running the heuristic policy");
            Models::default()
        }
    }
}

/// One lever's model as `kiln policy models` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The file stem: balloon, cpu or device.
    pub name: String,
    /// The lever its schema says it serves (empty when the schema is unreadable).
    pub lever: String,
    /// The schema's version (empty when the schema is unreadable).
    pub version: String,
    pub file: PathBuf,
    /// Size of the ONNX file in bytes, if it exists.
    pub size: Option<u64>,
    /// How many input features its schema names.
    pub features: Option<usize>,
    /// `None` when it loads and matches the engine's features, else why not.
    pub problem: Option<String>,
}

impl Entry {
    /// `name@version`, as the audit and the API name a model.
    pub fn id(&self) -> String {
        if self.version.is_empty() {
            self.name.clone()
        } else {
            format!("{}@{}", self.name, self.version)
        }
    }
}

/// What `kiln policy models` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// The models directory and why it was chosen, or why none was.
    pub dir: Place,
    /// The ONNX Runtime library and why it was chosen, or why none loads.
    pub runtime: Place,
    pub models: Vec<Entry>,
}

/// A place that was chosen (`path`) and why, or (no `path`) why none was.
#[derive(Debug, Clone, Serialize)]
pub struct Place {
    pub path: Option<PathBuf>,
    pub why: String,
}

impl Place {
    fn found(f: Found) -> Place {
        Place {
            path: Some(f.path),
            why: f.why,
        }
    }

    fn missing(why: String) -> Place {
        Place { path: None, why }
    }
}

/// Lists the models of the directory this process would use.
pub fn list(explicit: Option<&Path>) -> Listing {
    let dir = install::models_dir(explicit);
    // The library the search finds, loaded (or failed) once per process.
    let runtime = match (install::runtime_library(), runtime()) {
        (Ok(f), Ok(_)) => Place::found(f),
        (_, Err(e)) => Place::missing(e.to_string()),
        (Err(e), Ok(_)) => Place::missing(e.to_string()),
    };
    let runtime_ok = runtime.path.is_some();
    let (dir, models) = match dir {
        Ok(found) => {
            let models = MODEL_NAMES
                .iter()
                .map(|name| entry(&found.path, name, runtime_ok))
                .collect();
            (Place::found(found), models)
        }
        Err(e) => (Place::missing(e.to_string()), Vec::new()),
    };
    Listing {
        dir,
        runtime,
        models,
    }
}

fn entry(dir: &Path, name: &str, runtime_ok: bool) -> Entry {
    let file = dir.join(format!("{name}.onnx"));
    let size = std::fs::metadata(&file).ok().map(|m| m.len());
    let schema = Schema::load(&dir.join(format!("{name}.schema.json")));
    let (lever, version, features) = match &schema {
        Ok(s) => (s.lever.clone(), s.version.clone(), Some(s.features.len())),
        Err(_) => (String::new(), String::new(), None),
    };
    let problem = if let Err(e) = &schema {
        Some(e.to_string())
    } else if size.is_none() {
        Some(format!("{} is missing", file.display()))
    } else if !runtime_ok {
        Some("ONNX Runtime is not available".into())
    } else {
        let feats = engine_features(name).unwrap_or(&[]);
        Model::load(dir, name)
            .and_then(|m| m.schema.expect_features(feats))
            .err()
            .map(|e| e.to_string())
    };
    Entry {
        name: name.into(),
        lever,
        version,
        file,
        size,
        features,
        problem,
    }
}

/// The listing as text: where from and why, then one line per model.
pub fn render(l: &Listing) -> String {
    let mut out = String::new();
    match &l.dir.path {
        Some(p) => out.push_str(&format!("models: {} ({})\n", p.display(), l.dir.why)),
        None => out.push_str(&format!("models: none: {}\n", l.dir.why)),
    }
    match &l.runtime.path {
        Some(p) => out.push_str(&format!(
            "onnx runtime: {} ({})\n",
            p.display(),
            l.runtime.why
        )),
        None => out.push_str(&format!("onnx runtime: not loaded: {}\n", l.runtime.why)),
    }
    if l.models.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "{:<8} {:<24} {:>9} {:>8}  {:<6} file\n",
        "lever", "model", "bytes", "features", "loads"
    ));
    for m in &l.models {
        let lever = if m.lever.is_empty() { "?" } else { &m.lever };
        let size = m.size.map_or("-".into(), |s| s.to_string());
        let feats = m.features.map_or("-".into(), |f| f.to_string());
        let loads = if m.problem.is_none() { "yes" } else { "no" };
        out.push_str(&format!(
            "{lever:<8} {:<24} {size:>9} {feats:>8}  {loads:<6} {}\n",
            m.id(),
            m.file.display()
        ));
        if let Some(p) = &m.problem {
            out.push_str(&format!("         not used: {p}\n"));
        }
    }
    out
}
