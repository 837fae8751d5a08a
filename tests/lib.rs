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

pub mod garage;

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

/// `rel` under the folder test tools are installed into once
/// (`$SLMEDIA_TOOLS`, default `~/.cache/slmedia-tools`): Garage
/// (scripts/install-garage), the tuspy client (scripts/install-tuspy).
pub fn tool_path(rel: &str) -> PathBuf {
    std::env::var_os("SLMEDIA_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/slmedia-tools")
        })
        .join(rel)
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

/// The catalog engine this run of the suite puts under every manager:
/// `SLMEDIA_E2E_DB=postgres` (with `SLMEDIA_TEST_PG` naming a server,
/// as `scripts/test` sets for its second pass) or SQLite, the default.
pub fn on_postgres() -> bool {
    std::env::var("SLMEDIA_E2E_DB").is_ok_and(|v| v == "postgres")
}

/// Whether this run of the suite keeps the second view node's blobs in a
/// Garage bucket (`SLMEDIA_E2E_STORAGE=garage`, as `scripts/test` sets for
/// its second pass): every cluster of two or more nodes then has one node
/// on local disk and one on Garage, unless the test opts out
/// ([`ClusterOpts::garage_node`]) because it reads or breaks the node's
/// files itself.
pub fn garage_by_default() -> bool {
    std::env::var("SLMEDIA_E2E_STORAGE").is_ok_and(|v| v == "garage")
}

/// A `database_url = …` line for a new manager's configuration: empty
/// on SQLite (the manager's default file in its data folder), or a new
/// empty database on the test server, made with `psql`.
pub fn database_line() -> String {
    if !on_postgres() {
        return String::new();
    }
    format!("database_url = \"{}\"\n", new_pg_database())
}

/// A new empty database on the test server (`SLMEDIA_TEST_PG`), made with
/// `psql`; its URL.
pub fn new_pg_database() -> String {
    let server = std::env::var("SLMEDIA_TEST_PG")
        .expect("SLMEDIA_E2E_DB=postgres needs SLMEDIA_TEST_PG (scripts/pg-test-server)");
    let name = format!("e2e_{}", hex::encode(rand::random::<[u8; 8]>()));
    psql(&server, &format!("CREATE DATABASE {name}"));
    let (base, _) = server
        .rsplit_once('/')
        .expect("a server URL with a database");
    format!("{base}/{name}")
}

/// One statement through `psql` (not our code) on the database `url`;
/// what it printed, unaligned and without headers.
pub fn psql(url: &str, q: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", q])
        .output()
        .expect("psql (postgresql-client) runs");
    assert!(
        out.status.success(),
        "{q}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The MaxMind test city database kept in `tests/data/geoip`.
pub fn geoip_test_db() -> PathBuf {
    crate_dir().join("data/geoip/GeoIP2-City-Test.mmdb")
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
    /// Starts `binary --config config`, logging to `log`, and waits for
    /// its `LISTENING` line.
    pub fn spawn(name: &str, binary: &Path, config: &Path, log: PathBuf) -> Proc {
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

    /// The process id (to attach a tracer to it).
    pub fn pid(&self) -> u32 {
        self.child.id()
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

impl Node {
    /// The blobs the node holds (names), from its folder or its bucket.
    pub async fn held_blobs(&self) -> Vec<String> {
        use futures::TryStreamExt;
        match &self.bucket {
            None => files_under(&self.storage.join("blobs"))
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect(),
            Some(b) => object_store::ObjectStore::list(
                &**b,
                Some(&object_store::path::Path::from("blobs")),
            )
            .map_ok(|m| m.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await
            .expect("list the node's bucket"),
        }
    }
}

/// A running `transcoder run` ([`Cluster::start_transcoder`]).
pub struct Transcoder {
    pub name: String,
    pub state: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl Transcoder {
    /// Starts `transcoder run` on a registered state folder.
    pub fn run(name: &str, state: PathBuf, log: PathBuf) -> Transcoder {
        let child = Command::new(bin("transcoder"))
            .arg("--state")
            .arg(&state)
            .args(["run", "--poll-secs", "1"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("transcoder run");
        Transcoder {
            name: name.into(),
            state,
            log,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its exit status once it has exited, waiting up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then wait up to 30 s; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        match self.wait_exit(Duration::from_secs(30)) {
            Some(status) => status.success(),
            None => {
                self.kill9();
                false
            }
        }
    }
}

impl Drop for Transcoder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
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
    /// The node's `storage_dir` (its blobs too, unless `bucket` is set).
    pub storage: PathBuf,
    /// The bucket holding its blobs when they are in Garage.
    pub bucket: Option<std::sync::Arc<object_store::aws::AmazonS3>>,
    /// Hex secret shared with the manager (tests sign node calls with it).
    pub secret: String,
    /// The node's config file, to start it again ([`Cluster::restart_node`]).
    pub config: PathBuf,
}

/// The shape of a test cluster ([`Cluster::start_with`]).
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub nodes: Vec<String>,
    pub min_replicas: usize,
    /// Node `scrub_rate_mb_per_sec` and `scrub_interval_secs`.
    pub scrub_rate_mb_per_sec: f64,
    pub scrub_interval_secs: u64,
    /// Manager `[reconcile]`.
    pub reconcile_interval_secs: u64,
    pub unreferenced_grace_secs: u64,
    /// Pick every port up front so a node or the manager restarts on the
    /// same URL, and tell nodes the manager's URL (quarantine reports).
    pub fixed_ports: bool,
    /// TOML tables appended to the manager's configuration (e.g. a
    /// `[credits]` section with short windows for the credits tests).
    pub manager_extra: String,
    /// Top-level TOML lines appended to every node's configuration (e.g.
    /// short journal and price-poll intervals for the drills).
    pub node_extra: String,
    /// TLS inside the cluster, as `manager init-cluster --tls` sets it up:
    /// a private CA, a certificate per node, the manager calling each
    /// node's TLS port and sending viewers to its plain one.
    pub tls: bool,
    /// The manager's `database_url = …` line (empty: SQLite in its data
    /// folder); `None`: what this run of the suite uses ([`database_line`]).
    pub database: Option<String>,
    /// Node 1's blobs in a Garage bucket the cluster starts (default:
    /// [`garage_by_default`]); ignored with fewer than two nodes or when
    /// `node_tables[1]` is set.
    pub garage_node: bool,
    /// Tables appended to node `i`'s configuration, by index (e.g. a
    /// `[storage]` table from [`garage::Garage::storage_toml`]).
    pub node_tables: Vec<String>,
    /// Lines added to the manager's `[transcode]` table (e.g. `workers = 0`
    /// to leave every job to transcode workers, or a slower preset).
    pub transcode_extra: String,
}

impl ClusterOpts {
    /// The defaults [`Cluster::start`] uses: ports picked by the kernel,
    /// `min_replicas = 2`, product defaults for scrub and reconciliation.
    pub fn new(node_names: &[&str]) -> ClusterOpts {
        ClusterOpts {
            nodes: node_names.iter().map(|n| n.to_string()).collect(),
            min_replicas: 2,
            scrub_rate_mb_per_sec: 25.0,
            scrub_interval_secs: 86400,
            reconcile_interval_secs: 60,
            unreferenced_grace_secs: 7 * 86400,
            fixed_ports: false,
            manager_extra: String::new(),
            node_extra: String::new(),
            tls: false,
            database: None,
            transcode_extra: String::new(),
            node_tables: Vec::new(),
            garage_node: garage_by_default(),
        }
    }
}

/// A port free right now on 127.0.0.1, for a process the test starts and
/// may restart on the same port. Chosen below the kernel's ephemeral range
/// (32768 and up on Linux): a port the kernel handed out (`bind 0`) is soon
/// handed out again as the local end of some client connection, and then
/// the process cannot bind it (this failed a restore drill in CI).
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1");
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
    /// The manager's token key, so tests can mint tokens (expired ones,
    /// for another asset) that only the manager could otherwise make.
    pub token_signer: shared::TokenSigner,
    /// The Garage holding node 1's blobs ([`ClusterOpts::garage_node`]).
    pub garage: Option<garage::Garage>,
}

impl Cluster {
    /// Starts `node_names.len()` view nodes and a manager with
    /// `min_replicas = 2`.
    pub fn start(node_names: &[&str]) -> Cluster {
        Cluster::start_with(&ClusterOpts::new(node_names))
    }

    /// Starts a cluster shaped by `opts` (the drills: node count,
    /// `min_replicas`, scrub and reconciliation pace, fixed ports).
    pub fn start_with(opts: &ClusterOpts) -> Cluster {
        let node_names: Vec<&str> = opts.nodes.iter().map(String::as_str).collect();
        let node_names = &node_names[..];
        let port = |fixed: bool| if fixed { free_port() } else { 0 };
        let manager_port = port(opts.fixed_ports);
        let min_replicas = opts.min_replicas;
        let reconcile = format!(
            "[reconcile]\ninterval_secs = {}\nunreferenced_grace_secs = {}\n",
            opts.reconcile_interval_secs, opts.unreferenced_grace_secs
        );
        let mut node_extra = format!(
            "scrub_rate_mb_per_sec = {:?}\nscrub_interval_secs = {}\n",
            opts.scrub_rate_mb_per_sec, opts.scrub_interval_secs
        );
        if opts.fixed_ports {
            node_extra += &format!("manager_url = \"http://127.0.0.1:{manager_port}\"\n");
        }
        node_extra += &opts.node_extra;
        let dir = tempfile::tempdir().expect("temp dir");
        let master = hex32();
        let signer = shared::TokenSigner::generate();
        let ca = opts
            .tls
            .then(|| shared::tls::ClusterCa::generate("test").expect("a test CA"));
        let mut tables = opts.node_tables.clone();
        let garage = (opts.garage_node
            && node_names.len() >= 2
            && tables.get(1).is_none_or(String::is_empty))
        .then(|| {
            let g = garage::Garage::start();
            let bucket = format!("node-{}", node_names[1]);
            g.create_bucket(&bucket);
            tables.resize(node_names.len(), String::new());
            tables[1] = g.storage_toml(0, &bucket);
            g
        });
        let mut nodes = Vec::new();
        let mut node_sections = String::new();
        for (i, name) in node_names.iter().enumerate() {
            let secret = hex32();
            let storage = dir.path().join(format!("node-{name}"));
            let cfg = dir.path().join(format!("viewnode-{name}.toml"));
            let node_port = port(opts.fixed_ports);
            let (tls_lines, tls_url) = match &ca {
                None => (String::new(), None),
                Some(ca) => {
                    let tls_port = free_port();
                    let issued = ca.issue(name, &["127.0.0.1".into()]).unwrap();
                    let (crt, key) = (
                        dir.path().join(format!("{name}.crt")),
                        dir.path().join(format!("{name}.key")),
                    );
                    std::fs::write(&crt, issued.cert_pem).unwrap();
                    std::fs::write(&key, issued.key_pem).unwrap();
                    (
                        format!(
                            "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                            crt.display(),
                            key.display()
                        ),
                        Some(format!("https://127.0.0.1:{tls_port}")),
                    )
                }
            };
            std::fs::write(
                &cfg,
                format!(
                    "name = \"{name}\"\nlisten = \"127.0.0.1:{node_port}\"\nstorage_dir = \"{}\"\n\
                     master_key_id = 1\nmaster_key = \"{master}\"\ntoken_public_key = \"{}\"\n\
                     manager_secret = \"{secret}\"\nshutdown_grace_secs = 5\n{node_extra}{tls_lines}{}",
                    storage.display(),
                    signer.public_hex(),
                    tables.get(i).map_or("", String::as_str)
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
            node_sections += &match &tls_url {
                None => format!(
                    "\n[[nodes]]\nname = \"{name}\"\nurl = \"{}\"\nlat = {lat}\nlon = {lon}\nsecret = \"{secret}\"\n",
                    proc.url,
                ),
                Some(tls) => format!(
                    "\n[[nodes]]\nname = \"{name}\"\nurl = \"{tls}\"\npublic_url = \"{}\"\nlat = {lat}\nlon = {lon}\nsecret = \"{secret}\"\n",
                    proc.url,
                ),
            };
            let bucket = (i == 1)
                .then(|| {
                    garage
                        .as_ref()
                        .map(|g| g.client(0, &format!("node-{name}")))
                })
                .flatten();
            nodes.push(Node {
                proc,
                storage,
                bucket,
                secret,
                config: cfg,
            });
        }
        let manager_data = dir.path().join("manager");
        let mcfg = dir.path().join("manager.toml");
        std::fs::write(
            &mcfg,
            format!(
                "{}listen = \"127.0.0.1:{manager_port}\"\ndata_dir = \"{}\"\nmaster_key_id = 1\nmaster_key = \"{master}\"\n\
                 token_signing_key = \"{}\"\nshutdown_grace_secs = 5\nmin_replicas = {min_replicas}\n\
                 geoip_db = \"{}\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n{}\
                 [transcode]\n{}\n{reconcile}{}\n{node_sections}",
                opts.database.clone().unwrap_or_else(database_line),
                manager_data.display(),
                signer.seed_hex(),
                geoip_test_db().display(),
                ca.as_ref()
                    .map(|ca| format!("node_ca_cert = \"\"\"\n{}\"\"\"\n", ca.cert_pem()))
                    .unwrap_or_default(),
                // The fastest preset unless the test picks its own.
                if opts.transcode_extra.contains("preset") {
                    opts.transcode_extra.clone()
                } else {
                    format!("preset = \"ultrafast\"\n{}", opts.transcode_extra)
                },
                opts.manager_extra
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
            token_signer: signer,
            garage,
        }
    }

    /// [`Cluster::start`] with every node's blobs on its local disk, for
    /// tests that read or damage the nodes' files themselves.
    pub fn start_local(node_names: &[&str]) -> Cluster {
        let mut opts = ClusterOpts::new(node_names);
        opts.garage_node = false;
        Cluster::start_with(&opts)
    }

    /// Runs `manager --config <cluster config> <args>` (a CLI command next
    /// to the running manager) and returns its stdout; panics on failure.
    pub fn manager_cli(&self, args: &[&str]) -> String {
        let out = Command::new(bin("manager"))
            .arg("--config")
            .arg(&self.manager_config)
            .args(args)
            .output()
            .expect("manager command");
        assert!(
            out.status.success(),
            "manager {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Registers a transcode worker named `name` with a token from
    /// `manager transcoder-token` and starts `transcoder run` (state in the
    /// cluster's folder, log beside the others).
    pub fn start_transcoder(&self, name: &str) -> Transcoder {
        let token = self.manager_cli(&["transcoder-token", "--by", "e2e"]);
        let state = self.dir.path().join(format!("transcoder-{name}"));
        let out = Command::new(bin("transcoder"))
            .arg("--state")
            .arg(&state)
            .args(["register", "--manager", &self.manager.url, "--name", name])
            .args(["--token", &token])
            .output()
            .expect("transcoder register");
        assert!(
            out.status.success(),
            "transcoder register: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Transcoder::run(
            name,
            state,
            self.dir.path().join(format!("transcoder-{name}.log")),
        )
    }

    /// Starts the manager again on the same configuration and data (on a
    /// new port: the old one is the kernel's to reuse).
    pub fn restart_manager(&mut self) {
        let log = self.dir.path().join("manager-restarted.log");
        self.manager = Proc::spawn("manager", &bin("manager"), &self.manager_config, log);
    }

    /// Starts node `i` again on its configuration and storage (same port
    /// when the cluster has fixed ports). The old process must be stopped.
    pub fn restart_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let name = node.proc.name.clone();
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.dir.path().join(format!("{name}-restarted-{n}.log"));
        node.proc = Proc::spawn(&name, &bin("viewnode"), &node.config, log);
    }

    /// A manager-signed call to node `i` (as the manager would make it).
    pub async fn node_call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::Response {
        let node = &self.nodes[i];
        let secret = hex::decode(&node.secret).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let empty = shared::content_sha256_hex(b"");
        let auth = shared::sign_request(&secret, "manager", method.as_str(), path, now, &empty);
        self.client()
            .request(method, format!("{}{path}", node.proc.url))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now.to_string())
            .send()
            .await
            .expect("node call")
    }

    /// Node `i`'s inventory (`GET /internal/v1/blobs`, signed).
    pub async fn node_inventory(&self, i: usize) -> serde_json::Value {
        let r = self
            .node_call(i, reqwest::Method::GET, "/internal/v1/blobs")
            .await;
        assert!(r.status().is_success(), "inventory: {}", r.status());
        r.json().await.expect("inventory json")
    }

    /// The Prometheus text of `base_url/metrics`.
    pub async fn metrics(&self, base_url: &str) -> String {
        self.client()
            .get(format!("{base_url}/metrics"))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
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

    /// Uploads `file` as the operator and waits (up to `limit`) for the
    /// movie to publish; returns its id.
    pub async fn publish(&self, file: &Path, title: &str, limit: Duration) -> String {
        let (s, v) = self.upload(file, title).await.unwrap();
        assert_eq!(s, 202, "{v}");
        let asset = v["asset_id"].as_str().unwrap().to_string();
        let v = self.wait_terminal(&asset, limit).await;
        assert_eq!(v["state"], "published", "{v}");
        asset
    }

    /// Waits (up to two minutes) until the asset is transcoding with some
    /// progress reported, for a drill that cuts the transcode short.
    pub async fn wait_transcoding(&self, asset_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = self.asset(asset_id).await;
            if v["state"] == "transcoding" && v["progress"].as_f64().unwrap_or(0.0) > 0.0 {
                return;
            }
            assert_ne!(
                v["state"], "published",
                "finished before it could be cut short; make the input longer"
            );
            assert!(Instant::now() < deadline, "never started transcoding: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

/// A 20-second 720p MPEG-4 + MP3 file at `path`: minutes of work on the
/// slow preset, long enough for a drill to cut its transcode short.
pub fn make_long_movie(path: &Path) {
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=1280x720:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300",
        "-t",
        "20",
        "-c:v",
        "mpeg4",
        "-q:v",
        "5",
        "-c:a",
        "mp3",
        path.to_str().unwrap(),
    ]);
}

/// A 5-second 640x360 VP9 + Opus WebM, the issue's reference input.
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

/// A response's status and JSON body (`null` when the body is not JSON).
pub async fn status_json(r: reqwest::Response) -> (u16, serde_json::Value) {
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The stable code of an error answer (`{"error": {"code"}}`).
pub fn error_code(v: &serde_json::Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

/// A client that shows redirects instead of following them.
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// The `name=value` part of the cookie `name` that `r` sets.
pub fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|kv| kv.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// What a browser holds after opening a login or sign-up `page`: the CSRF
/// cookie (`slm_login_csrf=…`) and the token the form posts with it.
pub async fn login_csrf(base: &str, page: &str) -> (String, String) {
    let r = no_redirects()
        .get(format!("{base}{page}"))
        .send()
        .await
        .expect("the form page");
    let cookie = set_cookie(&r, "slm_login_csrf").expect("csrf cookie");
    let token = cookie.split_once('=').unwrap().1.to_string();
    (cookie, token)
}

/// Posts the login (or sign-up) form at `page` as a browser would; the
/// answer's status and the session cookie (`slm_session=…`) if one is set.
pub async fn form_login(
    base: &str,
    page: &str,
    email: &str,
    password: &str,
) -> (u16, Option<String>) {
    let (cookie, csrf) = login_csrf(base, page).await;
    let r = no_redirects()
        .post(format!("{base}{page}"))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", email),
            ("password", password),
        ])
        .send()
        .await
        .expect("the form post");
    (r.status().as_u16(), set_cookie(&r, "slm_session"))
}

/// The sum of a Prometheus metric's samples (every label set).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Cluster {
    /// `GET {manager}{path}` as the holder of API `token`.
    pub async fn get_as(&self, token: &str, path: &str) -> (u16, serde_json::Value) {
        status_json(
            self.client()
                .get(format!("{}{path}", self.manager.url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// `POST /api/v1/assets/{asset}/purchase` as the holder of `token`.
    pub async fn purchase(
        &self,
        token: &str,
        asset: &str,
        request: &str,
    ) -> (u16, serde_json::Value) {
        status_json(
            self.client()
                .post(format!(
                    "{}/api/v1/assets/{asset}/purchase",
                    self.manager.url
                ))
                .bearer_auth(token)
                .json(&serde_json::json!({ "request_id": request }))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Grants `amount` credits to the account `email` (the operator's CLI).
    pub fn grant_credits(&self, email: &str, amount: i64, reason: &str) {
        self.manager_cli(&[
            "grant-credits",
            "--email",
            email,
            "--amount",
            &amount.to_string(),
            "--reason",
            reason,
            "--by",
            "test",
        ]);
    }

    /// A new account `email` holding `credits` more than its sign-up
    /// bonus; returns its API token.
    pub fn buyer(&self, email: &str, credits: i64) -> String {
        self.manager_cli(&["create-user", "--email", email, "--generate-password"]);
        let token = self.manager_cli(&["create-token", "--email", email]);
        self.grant_credits(email, credits, "test");
        token
    }

    /// Sets a movie's view price as the operator (its uploader).
    pub async fn set_price(&self, asset: &str, price: i64) {
        let (s, v) = status_json(
            self.client()
                .put(format!("{}/api/v1/assets/{asset}/price", self.manager.url))
                .bearer_auth(&self.api_token)
                .json(&serde_json::json!({ "price": price }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
}

/// This crate's folder, as `cargo test` gives it when the test runs. The
/// compile-time value is only a fallback: a build folder shared by two
/// checkouts may hand one of them a binary compiled in the other.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// A small tmpfs mounted for a drill (the tests run as root); unmounted
/// when dropped, even when the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts an empty tmpfs of `size` (`64k`, `96m`) on the folder `dir`.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount a small tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Moves the folder `dir` (of a stopped process) onto a new tmpfs of
    /// `size`: its contents are copied over, the original kept as `aside`.
    pub fn move_onto(dir: &Path, aside: &Path, size: &str) -> Tmpfs {
        std::fs::rename(dir, aside).unwrap();
        std::fs::create_dir(dir).unwrap();
        let mount = Tmpfs::mount(dir, size);
        assert!(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", aside.display()))
            .arg(dir)
            .status()
            .unwrap()
            .success());
        mount
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
