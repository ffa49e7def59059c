//! `kiln policy models`: the listing, and an installed kiln (scripts/install.sh
//! into a temp prefix) finding its models and ONNX Runtime without any
//! environment variable. Needs ONNX Runtime (policy/training/setup.sh).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// ONNX Runtime as this test process finds it, or a failure saying how to get it.
fn runtime_library() -> PathBuf {
    kiln_policy::install::runtime_library()
        .unwrap_or_else(|e| {
            panic!("this test needs ONNX Runtime: {e}; run policy/training/setup.sh")
        })
        .path
}

/// `kiln policy models ARGS` without the developer's variables.
fn policy_models(kiln: &Path, args: &[&str], ort: Option<&Path>) -> Output {
    let mut cmd = Command::new(kiln);
    cmd.args(["policy", "models"])
        .args(args)
        .env_remove("KILN_MODELS_DIR")
        .env_remove("ORT_DYLIB_PATH");
    if let Some(ort) = ort {
        cmd.env("ORT_DYLIB_PATH", ort);
    }
    cmd.output().expect("running kiln policy models")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// name@version of each shipped model, from its schema file.
fn shipped_ids() -> Vec<(String, String)> {
    ["balloon", "cpu", "device"]
        .iter()
        .map(|name| {
            let path = repo().join(format!("policy/models/{name}.schema.json"));
            let schema: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let version = schema["version"].as_str().unwrap().to_string();
            assert!(!version.is_empty(), "{name} has no version");
            (name.to_string(), format!("{name}@{version}"))
        })
        .collect()
}

#[test]
fn lists_each_lever_with_version_size_features_and_whether_it_loads() {
    let ort = runtime_library();
    let models = repo().join("policy/models");
    let out = policy_models(
        Path::new(KILN),
        &["--models", models.to_str().unwrap(), "--check"],
        Some(&ort),
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "models: {} (given with --models)",
            models.display()
        )),
        "{all}"
    );
    assert!(stdout.contains("(from $ORT_DYLIB_PATH)"), "{all}");
    for ((name, id), lever) in shipped_ids().into_iter().zip(["balloon", "cpu", "device"]) {
        let size = std::fs::metadata(models.join(format!("{name}.onnx")))
            .unwrap()
            .len();
        let row = stdout
            .lines()
            .find(|l| l.contains(&id))
            .unwrap_or_else(|| panic!("no row for {id}\n{all}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], lever, "{row}");
        assert_eq!(cells[2], size.to_string(), "{row}");
        assert!(cells[3].parse::<usize>().unwrap() > 0, "{row}");
        assert_eq!(cells[4], "yes", "{row}");
        assert!(cells[5].ends_with(&format!("{name}.onnx")), "{row}");
    }
}

#[test]
fn a_directory_without_models_says_so_and_check_fails() {
    let empty = tempfile::tempdir().unwrap();
    let out = policy_models(
        Path::new(KILN),
        &["--models", empty.path().to_str().unwrap(), "--check"],
        Some(&runtime_library()),
    );
    let all = text(&out);
    assert!(!out.status.success(), "--check must fail\n{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["balloon", "cpu", "device"] {
        assert!(
            stdout.contains(&format!("{name}.schema.json")),
            "{name} not reported missing\n{all}"
        );
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not every model loads"),
        "{all}"
    );
}

#[test]
fn an_installed_kiln_finds_its_models_and_runtime_without_variables() {
    let ort = runtime_library();
    let tmp = tempfile::tempdir().unwrap();
    // install.sh copies kiln and kiln-vmm from --from; this test is about
    // where the installed kiln looks, so kiln stands in for kiln-vmm too.
    let from = tmp.path().join("built");
    std::fs::create_dir_all(&from).unwrap();
    std::fs::copy(KILN, from.join("kiln")).unwrap();
    std::fs::copy(KILN, from.join("kiln-vmm")).unwrap();
    let prefix = tmp.path().join("prefix");
    let install = Command::new(repo().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--from")
        .arg(&from)
        .env("ORT_DYLIB_PATH", &ort)
        .env_remove("KILN_MODELS_DIR")
        .output()
        .expect("running scripts/install.sh");
    assert!(install.status.success(), "{}", text(&install));

    let lib_dir = prefix.join("lib/kiln");
    assert!(lib_dir.join("libonnxruntime.so").is_file());
    for name in ["balloon", "cpu", "device"] {
        for ext in ["onnx", "schema.json", "md"] {
            let f = prefix.join(format!("share/kiln/models/{name}.{ext}"));
            assert!(f.is_file(), "{} not installed", f.display());
        }
    }

    let out = policy_models(&prefix.join("bin/kiln"), &["--json"], None);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let listing: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{all}"));
    let models_dir = prefix.join("share/kiln/models").canonicalize().unwrap();
    assert_eq!(
        listing["dir"]["path"].as_str().map(PathBuf::from),
        Some(models_dir.clone()),
        "{all}"
    );
    assert!(
        listing["dir"]["why"]
            .as_str()
            .unwrap()
            .contains("next to the running binary"),
        "{all}"
    );
    let runtime = PathBuf::from(listing["runtime"]["path"].as_str().unwrap_or_default());
    assert!(
        runtime.starts_with(lib_dir.canonicalize().unwrap()),
        "runtime from {} not the installed one\n{all}",
        runtime.display()
    );
    let entries = listing["models"].as_array().unwrap();
    for (name, id) in shipped_ids() {
        let e = entries
            .iter()
            .find(|e| e["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not listed\n{all}"));
        assert_eq!(
            format!(
                "{}@{}",
                e["name"].as_str().unwrap(),
                e["version"].as_str().unwrap()
            ),
            id
        );
        assert!(e["problem"].is_null(), "{name} does not load\n{all}");
        assert!(
            e["file"]
                .as_str()
                .unwrap()
                .starts_with(models_dir.to_str().unwrap()),
            "{all}"
        );
    }
}
