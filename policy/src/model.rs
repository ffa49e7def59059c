//! ONNX inference through ONNX Runtime, loaded at run time from the library
//! [`crate::install::runtime_library`] finds (`ORT_DYLIB_PATH`, else where
//! Kiln is installed, else what training/setup.sh fetched from PyPI).
//! Each model ships with a schema file (`<name>.schema.json`) naming its
//! features, their training ranges and its output; both are checked at load.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("ONNX Runtime is not available: {0}")]
    RuntimeUnavailable(String),
    #[error("cannot read {path}: {msg}")]
    Read { path: String, msg: String },
    #[error("schema {path} is invalid: {msg}")]
    Schema { path: String, msg: String },
    #[error("model {name} does not match its schema: {msg}")]
    Mismatch { name: String, msg: String },
    #[error("model {name} inference failed: {msg}")]
    Inference { name: String, msg: String },
}

/// One model input feature and the range it took in training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeatureSpec {
    pub name: String,
    pub min: f32,
    pub max: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Schema {
    pub name: String,
    pub version: String,
    /// Which lever the model serves ("balloon", "cpu", "device").
    pub lever: String,
    pub input: String,
    pub features: Vec<FeatureSpec>,
    pub output: String,
    /// What the output means, in words.
    pub output_meaning: String,
    pub output_min: f32,
    pub output_max: f32,
}

impl Schema {
    /// `name@version`, how the audit, the API and `kiln policy models` name a model.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn load(path: &Path) -> Result<Schema, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let s: Schema = serde_json::from_str(&text).map_err(|e| ModelError::Schema {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let bad = |msg: String| {
            Err(ModelError::Schema {
                path: path.display().to_string(),
                msg,
            })
        };
        if s.features.is_empty() || s.features.len() > 256 {
            return bad(format!("{} features (want 1..=256)", s.features.len()));
        }
        if let Some(f) = s
            .features
            .iter()
            .find(|f| !(f.min.is_finite() && f.max.is_finite() && f.min <= f.max))
        {
            return bad(format!(
                "feature {} has range [{}, {}]",
                f.name, f.min, f.max
            ));
        }
        if !(s.output_min.is_finite() && s.output_max.is_finite() && s.output_min <= s.output_max) {
            return bad("bad output range".into());
        }
        Ok(s)
    }

    /// Checks that the model consumes exactly the features `names`, in order.
    pub fn expect_features(&self, names: &[&str]) -> Result<(), ModelError> {
        let have: Vec<&str> = self.features.iter().map(|f| f.name.as_str()).collect();
        if have != names {
            return Err(ModelError::Mismatch {
                name: self.name.clone(),
                msg: format!("schema features {have:?}, engine computes {names:?}"),
            });
        }
        Ok(())
    }

    /// The first feature outside its training range (widened by `slack` of the
    /// range on each side), if any: the model would be extrapolating.
    pub fn out_of_distribution(&self, row: &[f32], slack: f32) -> Option<(usize, f32)> {
        self.features
            .iter()
            .zip(row)
            .enumerate()
            .find_map(|(i, (f, &x))| {
                let pad = slack * (f.max - f.min).max(1e-3);
                (x < f.min - pad || x > f.max + pad).then_some((i, x))
            })
    }
}

static RUNTIME: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process from where
/// [`crate::install::runtime_library`] finds it.
pub fn runtime() -> Result<&'static ort::environment::Environment, ModelError> {
    let r = RUNTIME.get_or_init(|| match crate::install::runtime_library() {
        Err(e) => Err(format!(
            "{e} (install Kiln with scripts/install.sh, or run policy/training/setup.sh)"
        )),
        Ok(found) => load_runtime(&found.path).map_err(|e| format!("{e} ({})", found.why)),
    });
    r.as_ref()
        .map_err(|e| ModelError::RuntimeUnavailable(e.clone()))
}

/// Loads ONNX Runtime once per process from `path` (the first load wins).
pub fn runtime_from(path: &Path) -> Result<&'static ort::environment::Environment, ModelError> {
    let r = RUNTIME.get_or_init(|| load_runtime(path));
    r.as_ref()
        .map_err(|e| ModelError::RuntimeUnavailable(e.clone()))
}

fn load_runtime(path: &Path) -> Result<ort::environment::Environment, String> {
    // ort panics later if a load failed and a session is attempted, so a
    // failed load is remembered here and no session is ever tried after it.
    if !path.is_file() {
        return Err(format!("{} does not exist", path.display()));
    }
    let builder = ort::init_from(path).map_err(|e| format!("loading {}: {e}", path.display()))?;
    builder
        .with_name("kiln-policy")
        .build()
        .map_err(|e| format!("initialising {}: {e}", path.display()))
}

/// A loaded model with its schema.
pub struct Model {
    pub schema: Schema,
    pub path: PathBuf,
    session: ort::session::Session,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({} {})", self.schema.name, self.schema.version)
    }
}

impl Model {
    /// Loads `<dir>/<name>.onnx` and `<dir>/<name>.schema.json` and checks that
    /// the graph takes one float tensor [N, features] and has the named output.
    pub fn load(dir: &Path, name: &str) -> Result<Model, ModelError> {
        let env = runtime()?;
        let schema = Schema::load(&dir.join(format!("{name}.schema.json")))?;
        let path = dir.join(format!("{name}.onnx"));
        let mismatch = |msg: String| ModelError::Mismatch {
            name: name.to_string(),
            msg,
        };
        let read_err = |e: String| ModelError::Read {
            path: path.display().to_string(),
            msg: e,
        };
        let session = ort::session::Session::builder(env)
            .map_err(|e| read_err(e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| read_err(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| read_err(e.to_string()))?
            .commit_from_file(&path)
            .map_err(|e| read_err(e.to_string()))?;
        let inputs = session.inputs();
        if inputs.len() != 1 || inputs[0].name() != schema.input {
            let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
            return Err(mismatch(format!(
                "inputs {names:?}, schema says [{:?}]",
                schema.input
            )));
        }
        let ty = inputs[0].dtype();
        if ty.tensor_type() != Some(ort::value::TensorElementType::Float32) {
            return Err(mismatch(format!("input type {ty:?}, want float32")));
        }
        let shape = ty.tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        if shape.len() != 2 || shape[1] != schema.features.len() as i64 {
            return Err(mismatch(format!(
                "input shape {shape:?}, schema has {} features",
                schema.features.len()
            )));
        }
        if !session.outputs().iter().any(|o| o.name() == schema.output) {
            let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
            return Err(mismatch(format!(
                "outputs {names:?} lack {:?}",
                schema.output
            )));
        }
        Ok(Model {
            schema,
            path,
            session,
        })
    }

    /// Runs the model on `rows` (row-major, `features` columns each); one output per row.
    pub fn predict(&mut self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        let k = self.schema.features.len();
        let fail = |msg: String| ModelError::Inference {
            name: self.schema.name.clone(),
            msg,
        };
        if rows.is_empty() || !rows.len().is_multiple_of(k) {
            return Err(fail(format!(
                "{} values is not a whole number of {k}-feature rows",
                rows.len()
            )));
        }
        let n = rows.len() / k;
        let input = ort::value::TensorRef::from_array_view(([n, k], rows))
            .map_err(|e| fail(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.schema.input.as_str() => input])
            .map_err(|e| fail(e.to_string()))?;
        let out = outputs
            .get(self.schema.output.as_str())
            .ok_or_else(|| fail("output missing".into()))?;
        let (_, values) = out
            .try_extract_tensor::<f32>()
            .map_err(|e| fail(e.to_string()))?;
        if values.len() != n {
            return Err(fail(format!("{} outputs for {n} rows", values.len())));
        }
        Ok(values.to_vec())
    }
}
