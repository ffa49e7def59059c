use clap::Parser;

use super::flags::{FlagError, RunArgs};
use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn flags(args: &[&str]) -> Result<VmConfig, FlagError> {
    let mut argv = vec!["kiln"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap().run.into_config()
}

const FLAGS: &[&str] = &[
    "--kernel=/k",
    "--initrd=/i",
    "--cmdline=console=ttyS0 quiet",
    "--cpus=2",
    "--memory=1G",
    "--console=file:/tmp/serial.log",
    "--on-reboot=restart",
    "--disk=path=/a.img,readonly,serial=S1",
    "--disk=path=/b.img,id=data",
    "--net=tap=ktap0,mac=52:54:00:12:34:56",
    "--vsock=cid=3,uds=/tmp/v.sock",
    "--virtio-console=file=/tmp/hvc0.log",
    "--balloon=deflate_on_oom=on,stats=1,free_page_reporting,target_mib=64",
    "--rng",
];

const JSON: &str = r#"{
  "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 quiet",
  "cpus": 2, "memory_mib": 1024, "serial": {"file": "/tmp/serial.log"},
  "on_reboot": "restart",
  "disks": [{"path": "/a.img", "readonly": true, "serial": "S1"}, {"path": "/b.img", "id": "data"}],
  "nets": [{"tap": "ktap0", "mac": "52:54:00:12:34:56"}],
  "vsock": {"cid": 3, "uds": "/tmp/v.sock"},
  "console": {"file": "/tmp/hvc0.log"},
  "balloon": {"deflate_on_oom": true, "stats": 1, "free_page_reporting": true, "target_mib": 64},
  "rng": {}
}"#;

const TOML: &str = r#"
kernel = "/k"
initrd = "/i"
cmdline = "console=ttyS0 quiet"
cpus = 2
memory_mib = 1024
serial = { file = "/tmp/serial.log" }
on_reboot = "restart"
vsock = { guest_cid = 3, uds_path = "/tmp/v.sock" }
console = { output_path = "/tmp/hvc0.log" }
balloon = { deflate_on_oom = true, stats_interval_s = 1, free_page_reporting = true, initial_target_mib = 64 }
rng = {}

[[disks]]
path = "/a.img"
read_only = true
serial = "S1"

[[disks]]
path = "/b.img"
id = "data"

[[nets]]
tap = "ktap0"
mac = "52:54:00:12:34:56"
"#;

#[test]
fn flags_json_and_toml_give_the_same_config() {
    let from_flags = flags(FLAGS).unwrap();
    let from_json = VmConfig::parse(JSON, SpecFormat::Json).unwrap();
    let from_toml = VmConfig::parse(TOML, SpecFormat::Toml).unwrap();
    assert_eq!(from_flags, from_json);
    assert_eq!(from_flags, from_toml);
    assert_eq!(from_flags.memory_mib, 1024);
    assert_eq!(
        from_flags.device_ids(),
        ["disk0", "data", "net0", "vsock0", "console0", "balloon0", "rng0"]
    );
    // The serialized form reads back as the same config.
    let json = serde_json::to_string(&from_flags).unwrap();
    assert_eq!(
        VmConfig::parse(&json, SpecFormat::Json).unwrap(),
        from_flags
    );
    let toml_text = toml::to_string(&from_flags).unwrap();
    assert_eq!(
        VmConfig::parse(&toml_text, SpecFormat::Toml).unwrap(),
        from_flags
    );
}

#[test]
fn defaults_match_kiln_run() {
    let c = flags(&["--kernel", "/k"]).unwrap();
    let j = VmConfig::parse(r#"{"kernel": "/k"}"#, SpecFormat::Json).unwrap();
    assert_eq!(c, j);
    assert_eq!(c, VmConfig::new("/k"));
    assert_eq!(
        (c.cpus, c.memory_mib, c.cmdline.as_str()),
        (1, 512, DEFAULT_CMDLINE)
    );
    assert_eq!(c.serial, SerialConsole::Stdio);
    let c = flags(&["--kernel=/k", "--virtio-console=none", "--rng=off"]).unwrap();
    assert_eq!(c.console, Some(ConsoleConfig::default()));
    assert_eq!(c.rng, None);
}

#[test]
fn the_balloon_deflates_on_oom_and_guards_by_default_everywhere() {
    let from_flags = flags(&["--kernel=/k", "--balloon"])
        .unwrap()
        .balloon
        .unwrap();
    let from_json = VmConfig::parse(r#"{"kernel": "/k", "balloon": {}}"#, SpecFormat::Json)
        .unwrap()
        .balloon
        .unwrap();
    let from_toml = VmConfig::parse("kernel = \"/k\"\nballoon = {}\n", SpecFormat::Toml)
        .unwrap()
        .balloon
        .unwrap();
    for b in [&from_flags, &from_json, &from_toml] {
        assert!(b.deflate_on_oom && b.pressure_guard, "{b:?}");
    }
    let off = flags(&[
        "--kernel=/k",
        "--balloon=deflate_on_oom=off,pressure_guard=off",
    ])
    .unwrap()
    .balloon
    .unwrap();
    assert!(!off.deflate_on_oom && !off.pressure_guard);
    let off = VmConfig::parse(
        r#"{"kernel": "/k", "balloon": {"deflate_on_oom": false, "pressure_guard": false}}"#,
        SpecFormat::Json,
    )
    .unwrap()
    .balloon
    .unwrap();
    assert!(!off.deflate_on_oom && !off.pressure_guard);
}

#[test]
fn bad_keys_and_values_name_the_flag_and_the_known_keys() {
    let err = |args: &[&str]| flags(args).unwrap_err().to_string();
    let e = err(&["--kernel=/k", "--disk=path=/a,ro=on"]);
    assert!(
        e.starts_with("--disk \"path=/a,ro=on\": unknown option \"ro\""),
        "{e}"
    );
    assert!(e.contains("readonly") && e.contains("serial"), "{e}");
    let e = err(&["--kernel=/k", "--disk=path=/a,path=/b"]);
    assert!(e.contains("given twice"), "{e}");
    let e = err(&["--kernel=/k", "--net=tap=a/b"]);
    assert!(e.contains("invalid value \"a/b\" for tap"), "{e}");
    let e = err(&["--kernel=/k", "--vsock=cid=2,uds=/x"]);
    assert!(e.contains("for cid") && e.contains("at least 3"), "{e}");
    let e = err(&["--kernel=/k", "--balloon=stats=-1"]);
    assert!(e.contains("for stats"), "{e}");
    let e = err(&["--kernel=/k", "--balloon=stats=1,stats_interval_s=2"]);
    assert!(e.contains("twice"), "{e}");
    let e = err(&["--kernel=/k", "--rng=fast"]);
    assert!(e.contains("--rng") && e.contains("known: none"), "{e}");
    assert!(err(&["--kernel=/k", "--memory=12X"]).contains("unknown suffix"));
    assert!(err(&["--kernel=/k", "--console=tcp:1"])
        .contains("use stdio, none, file:PATH or socket:PATH"));
    assert!(err(&["--kernel=/k", "--console=file:"]).contains("file:PATH"));
    assert!(err(&["--cpus=2"]).contains("--kernel is required"));
    assert!(err(&["--config=/x.json", "--cpus=2"]).contains("--cpus"));
}

#[test]
fn spec_files_reject_unknown_fields_and_bad_values() {
    for (text, needle) in [
        (r#"{"kernel": "/k", "memory": 5}"#, "unknown field `memory`"),
        (
            r#"{"kernel": "/k", "disks": [{"path": "/a", "ro": true}]}"#,
            "ro",
        ),
        (
            r#"{"kernel": "/k", "nets": [{"tap": "a b"}]}"#,
            "must not contain",
        ),
        (
            r#"{"kernel": "/k", "nets": [{"tap": "t", "mac": "01:00:5e:00:00:01"}]}"#,
            "multicast",
        ),
        (r#"{"kernel": "/k", "serial": "tcp"}"#, "unknown variant"),
        (r#"{"cpus": 1}"#, "missing field `kernel`"),
        (r#"{"kernel": "/k", "cpus": -1}"#, "invalid value"),
    ] {
        let e = VmConfig::parse(text, SpecFormat::Json).unwrap_err();
        assert!(e.contains(needle), "{text}: {e}");
    }
    let e = VmConfig::parse("kernel = \"/k\"\nmemroy_mib = 3\n", SpecFormat::Toml).unwrap_err();
    assert!(e.contains("memroy_mib"), "{e}");
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("kiln-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k"), b"x").unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
        Files { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn validation_messages_name_the_problem() {
    let f = Files::new("validate");
    let host = HostLimits {
        max_vcpus: Some(8),
        memory_mib: Some(4096),
    };
    let ok = VmConfig::new(f.path("k"));
    ok.validate(&host).unwrap();
    let err = |c: VmConfig| c.validate(&host).unwrap_err().to_string();
    let with = |edit: &dyn Fn(&mut VmConfig)| {
        let mut c = ok.clone();
        edit(&mut c);
        c.assign_device_ids();
        err(c)
    };
    assert!(err(VmConfig::new(f.path("nope"))).contains("cannot open kernel"));
    assert!(err(VmConfig::new(f.path("empty"))).contains("is empty"));
    assert!(err(VmConfig::new(&f.dir)).contains("not a regular file"));
    assert!(with(&|c| c.initrd = Some(f.path("nope"))).contains("cannot open initrd"));
    assert_eq!(with(&|c| c.cpus = 0), "cpus must be at least 1");
    assert!(with(&|c| c.cpus = 255).contains("254"));
    assert!(with(&|c| c.cpus = 9).contains("KVM allows (8)"));
    assert!(with(&|c| c.memory_mib = 1).contains("too small"));
    assert!(with(&|c| c.memory_mib = 8192).contains("more than this host's 4 GiB"));
    assert!(with(&|c| c.memory_mib = u64::MAX).contains("cannot be addressed"));
    assert!(with(&|c| c.balloon = Some(BalloonConfig {
        initial_target_mib: 512,
        ..Default::default()
    }))
    .contains("below the guest's memory (512 MiB)"));
    assert!(with(&|c| c.disks.push(BlockConfig::new(f.path("nope"))))
        .contains("cannot open disk image"));
    let dup = with(&|c| {
        let mut a = BlockConfig::new(f.path("k"));
        a.id = "x".into();
        let mut b = NetConfig::new("t0");
        b.id = "x".into();
        c.disks.push(a);
        c.nets.push(b);
    });
    assert_eq!(dup, "device id \"x\" is used by two devices");
    // The first disk's default id taken by the second's explicit one.
    let dup = with(&|c| {
        c.disks.push(BlockConfig::new(f.path("k")));
        let mut b = BlockConfig::new(f.path("k"));
        b.id = "disk0".into();
        c.disks.push(b);
    });
    assert!(dup.contains("\"disk0\""), "{dup}");
}
