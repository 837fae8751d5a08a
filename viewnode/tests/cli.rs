//! A wrong or missing configuration value exits non-zero naming the field.

use std::process::Command;

#[test]
fn a_bad_config_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("viewnode.toml");
    std::fs::write(&cfg, "name = \"utah\"\nmaster_key = \"00\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_viewnode"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`master_key`"),
        "{out:?}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_viewnode"))
        .env("VIEWNODE_NAME", "")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`name`"),
        "{out:?}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_viewnode"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
}
