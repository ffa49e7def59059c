//! The policy engine's models and ONNX Runtime in the nested host, in the
//! installed layout under /usr (as `scripts/install.sh --prefix /usr` puts
//! them), so the daemon there finds them next to /usr/bin/kiln with no
//! environment variable and runs the learned models.

use std::path::Path;

use kiln_policy::install::{runtime_library, MODELS_SUBDIR, RUNTIME_SUBDIR};

use crate::initrd::Tree;
use crate::RigError;

/// Adds this source tree's models (with schema files and model cards) and
/// the ONNX Runtime this process finds, with the libraries it needs.
pub fn add(tree: &mut Tree) -> Result<(), RigError> {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/models");
    let entries = std::fs::read_dir(&models)
        .map_err(|e| RigError::Setup(format!("reading {}: {e}", models.display())))?;
    for entry in entries {
        let path = entry
            .map_err(|e| RigError::Setup(format!("reading {}: {e}", models.display())))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if [".onnx", ".schema.json", ".md"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            let data = std::fs::read(&path)
                .map_err(|e| RigError::Setup(format!("reading {}: {e}", path.display())))?;
            tree.file(&format!("usr/{MODELS_SUBDIR}/{name}"), 0o644, data);
        }
    }
    match runtime_library() {
        Ok(found) => {
            let data = std::fs::read(&found.path).map_err(|e| {
                RigError::Setup(format!("reading {}: {e}", found.path.display()))
            })?;
            tree.file(
                &format!("usr/{RUNTIME_SUBDIR}/libonnxruntime.so"),
                0o755,
                data,
            );
            tree.libraries_of(&found.path)?;
        }
        // Scenarios without the engine still run; ones that need it fail
        // on their own check, and this says why.
        Err(e) => eprintln!(
            "kiln-rig: {e}: the nested host gets no ONNX Runtime and its policy engine runs the heuristic (run policy/training/setup.sh)"
        ),
    }
    Ok(())
}
