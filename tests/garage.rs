//! Real Garage servers for the tests: one process (or a cluster of them)
//! with its own folders and ports, a layout, a key and buckets made with
//! Garage's own CLI, stopped when dropped.
//!
//! The binary comes from `SLMEDIA_GARAGE`, else `$SLMEDIA_TOOLS/bin/garage`
//! (default `~/.cache/slmedia-tools`), where `scripts/setup test` installs
//! it once (`cargo install garage`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use object_store::aws::{AmazonS3, AmazonS3Builder};

/// The Garage binary the tests use.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLMEDIA_GARAGE") {
        return PathBuf::from(p);
    }
    let p = crate::tool_path("bin/garage");
    assert!(
        p.exists(),
        "{} is missing: `scripts/setup test` installs it (cargo install garage)",
        p.display()
    );
    p
}

/// One Garage process.
struct Server {
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    web_port: u16,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("garage log");
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Garage on loopback: `n` processes, replication factor `n`.
pub struct Garage {
    pub dir: tempfile::TempDir,
    servers: Vec<Server>,
    pub key_id: String,
    pub secret: String,
}

const RPC_SECRET_LEN: usize = 32;

impl Garage {
    /// One Garage process, ready: layout applied, a key made.
    pub fn start() -> Garage {
        Garage::start_cluster(1)
    }

    /// `n` Garage processes in one zone each, replication factor `n`.
    pub fn start_cluster(n: usize) -> Garage {
        let dir = tempfile::tempdir().expect("temp dir");
        let rpc_secret = hex::encode(rand::random::<[u8; RPC_SECRET_LEN]>());
        let mut servers = Vec::new();
        for i in 0..n {
            let d = dir.path().join(format!("g{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let (rpc, s3, web, admin) = (
                crate::free_port(),
                crate::free_port(),
                crate::free_port(),
                crate::free_port(),
            );
            let config = d.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = {n}\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"{rpc_secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\
                     [s3_web]\nbind_addr = \"127.0.0.1:{web}\"\nroot_domain = \".web.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                    d = d.display()
                ),
            )
            .unwrap();
            let mut s = Server {
                config,
                log: d.join("garage.log"),
                s3_port: s3,
                web_port: web,
                child: None,
            };
            s.spawn();
            servers.push(s);
        }
        let mut g = Garage {
            dir,
            servers,
            key_id: String::new(),
            secret: String::new(),
        };
        let ids: Vec<String> = (0..n).map(|i| g.node_id(i)).collect();
        for id in &ids[1..] {
            g.cli(0, &["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap();
            g.cli(
                0,
                &[
                    "layout",
                    "assign",
                    short,
                    "-z",
                    &format!("z{i}"),
                    "-c",
                    "1G",
                ],
            );
        }
        g.cli(0, &["layout", "apply", "--version", "1"]);
        let key: serde_json::Value = serde_json::from_str(
            &g.cli(0, &["json-api", "CreateKey", r#"{"name":"slmedia-test"}"#]),
        )
        .expect("CreateKey answers JSON");
        g.key_id = key["accessKeyId"].as_str().unwrap().to_string();
        g.secret = key["secretAccessKey"].as_str().unwrap().to_string();
        g
    }

    /// Runs Garage's CLI against server `i`; its standard output.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.servers[i].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text(i)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `<node id>@<rpc address>` of server `i`, once it answers.
    fn node_id(&self, i: usize) -> String {
        let started = Instant::now();
        loop {
            let answers = Command::new(garage_bin())
                .arg("-c")
                .arg(&self.servers[i].config)
                .arg("status")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run garage")
                .success();
            if answers {
                return self.cli(i, &["node", "id", "-q"]).trim().to_string();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "garage did not start:\n{}",
                self.log_text(i)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// Makes `bucket`, readable and writable with the key.
    pub fn create_bucket(&self, bucket: &str) {
        self.cli(0, &["bucket", "create", bucket]);
        self.cli(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                bucket,
                "--key",
                &self.key_id,
            ],
        );
    }

    /// Server `i`'s S3 endpoint.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.servers[i].s3_port)
    }

    /// Server `i`'s website endpoint (buckets shown with `bucket website`).
    pub fn web_port(&self, i: usize) -> u16 {
        self.servers[i].web_port
    }

    /// The view node's `[storage]` table for `bucket` on server `i`.
    pub fn storage_toml(&self, i: usize, bucket: &str) -> String {
        format!(
            "[storage]\nkind = \"s3\"\nendpoint = \"{}\"\nregion = \"garage\"\nbucket = \"{bucket}\"\n\
             key_id = \"{}\"\nsecret_key = \"{}\"\npath_style = true\n",
            self.endpoint(i),
            self.key_id,
            self.secret
        )
    }

    /// An S3 client on `bucket` (the tests' own hands on the objects).
    pub fn client(&self, i: usize, bucket: &str) -> Arc<AmazonS3> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint(i))
                .with_region("garage")
                .with_bucket_name(bucket)
                .with_access_key_id(&self.key_id)
                .with_secret_access_key(&self.secret)
                .with_allow_http(true)
                .build()
                .expect("an S3 client"),
        )
    }

    /// Kills server `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Starts server `i` again with its folders as they were, and waits
    /// until it answers.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].spawn();
        self.node_id(i);
    }

    pub fn running(&self, i: usize) -> bool {
        self.servers[i].child.is_some()
    }

    /// Path of server `i`'s configuration (for commands run by hand).
    pub fn config(&self, i: usize) -> &Path {
        &self.servers[i].config
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
    }
}
