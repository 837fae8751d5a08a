//! Records the git commit the binaries are built from, so each process can
//! report it (`/healthz`) and the operator's console can tell a node running
//! other code from its peers. `SLMEDIA_GIT_COMMIT` overrides it (a build
//! from a tarball); without git or a repository it is `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SLMEDIA_GIT_COMMIT");
    let commit = std::env::var("SLMEDIA_GIT_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    // Rebuild when HEAD moves: HEAD itself, and the branch it points at.
    if let Ok(out) = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !dir.is_empty() {
            let dir = std::path::Path::new(&dir);
            println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
            if let Ok(head) = std::fs::read_to_string(dir.join("HEAD")) {
                if let Some(r) = head.trim().strip_prefix("ref: ") {
                    println!("cargo:rerun-if-changed={}", dir.join(r).display());
                }
            }
        }
    }
    println!(
        "cargo:rustc-env=SLMEDIA_GIT_COMMIT={}",
        commit
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "unknown".into())
    );
}
