//! Harness for the end-to-end tests: starts real `viewnode` and `manager`
//! processes on port 0 in a temporary folder, with fresh secrets, an
//! operator account and an API token, and stops them when dropped.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rand::RngCore;

/// Folder holding the built binaries: `SLMEDIA_BIN_DIR`, or the cargo
/// profile folder this test binary was built into (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SLMEDIA_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

/// The MaxMind test city database kept in `tests/data/geoip`.
pub fn geoip_test_db() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/geoip/GeoIP2-City-Test.mmdb")
}

fn hex32() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// A running binary. Dropping it sends SIGTERM and waits.
pub struct Proc {
    pub name: String,
    pub url: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, binary: &Path, config: &Path, log: PathBuf) -> Proc {
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not start; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Proc {
            name: name.into(),
            url,
            log,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the process gets no chance to tidy up (a crash, a power cut).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to 30 s; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

pub struct Node {
    pub proc: Proc,
    pub storage: PathBuf,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub manager: Proc,
    pub manager_config: PathBuf,
    pub manager_data: PathBuf,
    pub operator_email: String,
    pub operator_password: String,
    pub api_token: String,
}

impl Cluster {
    /// Starts `node_names.len()` view nodes and a manager with
    /// `min_replicas = 2`.
    pub fn start(node_names: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let master = hex32();
        let signer = shared::TokenSigner::generate();
        let mut nodes = Vec::new();
        let mut node_sections = String::new();
        for (i, name) in node_names.iter().enumerate() {
            let secret = hex32();
            let storage = dir.path().join(format!("node-{name}"));
            let cfg = dir.path().join(format!("viewnode-{name}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstorage_dir = \"{}\"\n\
                     master_key_id = 1\nmaster_key = \"{master}\"\ntoken_public_key = \"{}\"\n\
                     manager_secret = \"{secret}\"\nshutdown_grace_secs = 5\n",
                    storage.display(),
                    signer.public_hex()
                ),
            )
            .unwrap();
            let proc = Proc::spawn(
                name,
                &bin("viewnode"),
                &cfg,
                dir.path().join(format!("{name}.log")),
            );
            let (lat, lon) = match *name {
                "utah" => (40.76, -111.89),
                "toronto" => (43.65, -79.38),
                _ => (i as f64, i as f64),
            };
            node_sections += &format!(
                "\n[[nodes]]\nname = \"{name}\"\nurl = \"{}\"\nlat = {lat}\nlon = {lon}\nsecret = \"{secret}\"\n",
                proc.url,
            );
            nodes.push(Node { proc, storage });
        }
        let manager_data = dir.path().join("manager");
        let mcfg = dir.path().join("manager.toml");
        std::fs::write(
            &mcfg,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmaster_key_id = 1\nmaster_key = \"{master}\"\n\
                 token_signing_key = \"{}\"\nshutdown_grace_secs = 5\nmin_replicas = 2\n\
                 geoip_db = \"{}\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
                 [transcode]\npreset = \"ultrafast\"\n{node_sections}",
                manager_data.display(),
                signer.seed_hex(),
                geoip_test_db().display()
            ),
        )
        .unwrap();
        let operator_email = "operator@example.com".to_string();
        let out = Command::new(bin("manager"))
            .args(["--config"])
            .arg(&mcfg)
            .args([
                "create-user",
                "--email",
                &operator_email,
                "--role",
                "operator",
                "--generate-password",
            ])
            .output()
            .expect("manager create-user");
        assert!(
            out.status.success(),
            "create-user: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let operator_password = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let out = Command::new(bin("manager"))
            .args(["--config"])
            .arg(&mcfg)
            .args(["create-token", "--email", &operator_email])
            .output()
            .expect("manager create-token");
        assert!(
            out.status.success(),
            "create-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let api_token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let manager = Proc::spawn(
            "manager",
            &bin("manager"),
            &mcfg,
            dir.path().join("manager.log"),
        );
        Cluster {
            dir,
            nodes,
            manager,
            manager_config: mcfg,
            manager_data,
            operator_email,
            operator_password,
            api_token,
        }
    }

    /// Starts the manager again on the same configuration and data (on a
    /// new port: the old one is the kernel's to reuse).
    pub fn restart_manager(&mut self) {
        let log = self.dir.path().join("manager-restarted.log");
        self.manager = Proc::spawn("manager", &bin("manager"), &self.manager_config, log);
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }

    /// Uploads `file` through the API; returns the asset id.
    pub async fn upload(
        &self,
        file: &Path,
        title: &str,
    ) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
        let bytes = std::fs::read(file)?;
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let form = reqwest::multipart::Form::new()
            .text("title", title.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name),
            );
        let resp = self
            .client()
            .post(format!("{}/api/v1/uploads", self.manager.url))
            .bearer_auth(&self.api_token)
            .multipart(form)
            .send()
            .await?;
        let status = resp.status();
        Ok((status, resp.json().await?))
    }

    /// The asset's status, as its owner sees it.
    pub async fn asset(&self, asset_id: &str) -> serde_json::Value {
        self.client()
            .get(format!("{}/api/v1/assets/{asset_id}", self.manager.url))
            .bearer_auth(&self.api_token)
            .send()
            .await
            .expect("status request")
            .json()
            .await
            .expect("status json")
    }

    /// `GET /api/v1/assets`: the operator's own uploads.
    pub async fn my_assets(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = self
            .client()
            .get(format!("{}/api/v1/assets", self.manager.url))
            .bearer_auth(&self.api_token)
            .send()
            .await
            .expect("list request")
            .json()
            .await
            .expect("list json");
        v["assets"].as_array().expect("assets array").clone()
    }

    /// Where the redirector sends a GET of `media_url` (not followed).
    pub async fn redirect_location(&self, media_url: &str) -> String {
        let no_follow = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = no_follow
            .get(media_url)
            .send()
            .await
            .expect("media request");
        assert_eq!(r.status(), 302, "{media_url}");
        r.headers()["location"].to_str().unwrap().to_string()
    }

    /// Polls the asset until it reaches a terminal state or `limit` passes.
    pub async fn wait_terminal(&self, asset_id: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.asset(asset_id).await;
            let state = v["state"].as_str().unwrap_or("").to_string();
            if matches!(state.as_str(), "published" | "rejected" | "damaged") {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "asset {asset_id} stuck in {state}: {v}\nmanager log:\n{}",
                self.manager.log_text()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs the `ffmpeg` command (tests only: product code never does) to make
/// an input file.
pub fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .expect("the ffmpeg command is installed by scripts/test");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 5-second 640x360 VP9 + Opus WebM, the reference input.
pub fn make_webm(path: &Path) {
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        "5",
        "-c:v",
        "libvpx-vp9",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "400k",
        "-c:a",
        "libopus",
        path.to_str().unwrap(),
    ]);
}

/// Top-level MP4 box types in file order.
pub fn mp4_top_level_boxes(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let mut size = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as u64;
        let kind = String::from_utf8_lossy(&data[pos + 4..pos + 8]).to_string();
        if size == 1 && pos + 16 <= data.len() {
            size = u64::from_be_bytes(data[pos + 8..pos + 16].try_into().unwrap());
        } else if size == 0 {
            size = (data.len() - pos) as u64;
        }
        out.push(kind);
        if size < 8 {
            break;
        }
        pos += size as usize;
    }
    out
}
