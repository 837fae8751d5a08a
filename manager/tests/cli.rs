//! The binary's own command line: `--help`, and a wrong or missing
//! configuration value exits non-zero with a message naming the field.

use std::process::Command;

fn manager() -> Command {
    Command::new(env!("CARGO_BIN_EXE_manager"))
}

#[test]
fn help_lists_the_commands() {
    let out = manager().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "create-user", "create-token", "init-cluster"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn a_bad_config_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("manager.toml");
    std::fs::write(&cfg, "master_key = \"short\"\n").unwrap();
    let out = manager().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`master_key`"),
        "{out:?}"
    );

    let out = manager()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );
}

#[test]
fn the_config_file_can_be_named_by_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = manager()
        .args(["init-cluster", "--dir"])
        .arg(dir.path())
        .args([
            "--node",
            "a:1:2:127.0.0.1:18091",
            "--node",
            "b:3:4:127.0.0.1:18092",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    // MANAGER_CONFIG is the file's name, not a configuration field.
    let out = manager()
        .env("MANAGER_CONFIG", dir.path().join("manager.toml"))
        .args([
            "create-user",
            "--email",
            "x@example.com",
            "--generate-password",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_manager"))
        .env("MANAGER_CONFIG", dir.path().join("manager.toml"))
        .env("MANAGER_MIN_REPLICAS", "zero")
        .arg("create-token")
        .args(["--email", "x@example.com"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Named as the operator wrote it: the MANAGER_MIN_REPLICAS variable.
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("min_replicas"));
}

#[test]
fn init_cluster_writes_configs_that_load_and_never_overwrites_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        manager()
            .args(["init-cluster", "--dir"])
            .arg(dir.path())
            .args([
                "--node",
                "utah:40.76:-111.89:127.0.0.1:18081",
                "--node",
                "toronto:43.65:-79.38:127.0.0.1:18082",
            ])
            .output()
            .unwrap()
    };
    assert!(run().status.success());
    let m = manager::Config::load(Some(&dir.path().join("manager.toml"))).unwrap();
    assert_eq!(m.nodes.len(), 2);
    assert_eq!(m.nodes[1].name, "toronto");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("viewnode-utah.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "secrets file readable by others");
    let again = run();
    assert!(!again.status.success(), "must refuse to overwrite secrets");
}
