//! `crdgen --help` prints help and writes nothing; an unknown flag is an
//! error, not a regeneration.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

fn modified() -> Vec<SystemTime> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["crds", "charts/infergate/crds"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| e.metadata().unwrap().modified().unwrap())
        .collect()
}

#[test]
fn help_prints_usage_and_writes_nothing() {
    let before = modified();
    for flag in ["--help", "-h"] {
        let out = Command::new(env!("CARGO_BIN_EXE_crdgen"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("usage: crdgen [--check]"), "{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_crdgen"))
        .arg("--chek")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument \"--chek\""));
    assert_eq!(before, modified(), "crdgen rewrote CRD files");
}
