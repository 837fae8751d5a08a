use std::{io::Read, path::PathBuf};

use clap::{Parser, Subcommand};
use manager::{
    auth,
    catalog::{self, Refused, TxError},
    Config,
};

/// The manager: web site, JSON API, ingest pipeline and redirector.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see manager/manager.example.toml). Every field
    /// can also be set with a `MANAGER_<FIELD>` environment variable
    /// (nested: `MANAGER_TRANSCODE__CRF`).
    #[arg(short, long, env = "MANAGER_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web site and API and run the pipeline (the default).
    Serve,
    /// Create an account. The password is read from standard input; with
    /// `--generate-password` a random one is made and printed once.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "uploader", value_parser = ["uploader", "operator"])]
        role: String,
        #[arg(long)]
        generate_password: bool,
    },
    /// Create an API token for an account and print it (shown only once).
    CreateToken {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "cli")]
        label: String,
    },
    /// Make a one-time registration token for a transcode worker (good for
    /// an hour) and print it; the admin's jobs page makes them too.
    TranscoderToken {
        /// Who made it (shown with the worker it registers).
        #[arg(long, default_value = "cli")]
        by: String,
    },
    /// Revoke a transcode worker: its next call is refused.
    TranscoderRevoke {
        #[arg(long)]
        name: String,
    },
    /// Grant credits to one account (`--email`) or to every account created
    /// before a unix time (`--created-before`), recorded with who and why.
    /// `--key` makes it idempotent: running it again grants nobody twice.
    GrantCredits {
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        created_before: Option<i64>,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        reason: String,
        /// Who grants (recorded as `operator:<by>`).
        #[arg(long)]
        by: String,
        /// Idempotency key; default: a fresh one (the grant always applies).
        #[arg(long)]
        key: Option<String>,
    },
    /// Probe a media file as an upload would be, and print what was found
    /// (or the rejection code and sentence).
    MediaProbe { file: PathBuf },
    /// Convert a file to the Second Life profile exactly as the pipeline
    /// does (remuxing when it can), printing what was done.
    MediaTranscode {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value = "veryfast")]
        preset: String,
        #[arg(long, default_value_t = 23)]
        crf: u8,
        /// Always re-encode, even when the input could be remuxed.
        #[arg(long)]
        no_copy: bool,
    },
    /// Database backups: `now`, `list`, `verify`, `restore` (docs/backup.md).
    Backup {
        #[command(subcommand)]
        cmd: manager::backup::BackupCommand,
    },
    /// Write a ready-to-run set of configuration files, with fresh secrets,
    /// for one manager and the named view nodes, all on this machine.
    InitCluster {
        /// Folder for the files and for every process's data.
        #[arg(long)]
        dir: PathBuf,
        /// Manager listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// A node as `name:lat:lon:listen`, e.g. `utah:40.76:-111.89:127.0.0.1:8081`.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// TLS between the manager and the nodes: a private cluster CA
        /// (`cluster-ca.pem`, and its key `cluster-ca.key` to keep off the
        /// machines) and a certificate per node; each node takes the
        /// manager's calls over TLS on its listen port + 10 and serves
        /// viewers on its listen port.
        #[arg(long)]
        tls: bool,
    },
}

fn main() -> std::process::ExitCode {
    // First, before any code built for this CPU's extensions can run.
    if let Err(msg) = shared::runtime::check_build_cpu("manager") {
        eprintln!("{msg}");
        return std::process::ExitCode::from(2);
    }
    let cli = Cli::parse();
    manager::init_tracing();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("manager: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Some(Command::Backup { .. })) {
        let Some(Command::Backup { cmd }) = cli.command else {
            unreachable!("matched above")
        };
        // `restore` runs on an empty machine, without a configuration.
        return manager::backup::cli(cmd, cli.config.as_deref()).await;
    }
    match &cli.command {
        Some(Command::InitCluster {
            dir,
            listen,
            nodes,
            tls,
        }) => return init_cluster(dir, listen, nodes, *tls),
        Some(Command::MediaProbe { file }) => {
            let info =
                manager::media::probe(file).map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
            println!("{info:#?}");
            return Ok(());
        }
        Some(Command::MediaTranscode {
            input,
            output,
            preset,
            crf,
            no_copy,
        }) => {
            let profile = manager::media::Profile {
                preset: preset.clone(),
                crf: *crf,
                allow_copy: !no_copy,
                ..manager::media::Profile::default()
            };
            let never = std::sync::atomic::AtomicBool::new(false);
            let out = manager::media::transcode(input, output, &profile, &mut |_| {}, &never)
                .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
            println!(
                "{}x{} {:.2}s video_copied={} audio_copied={}",
                out.width, out.height, out.duration_secs, out.video_copied, out.audio_copied
            );
            return Ok(());
        }
        _ => {}
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            // One process per embedded database, refused before anything
            // reads it; held until this process ends.
            let _claim = manager::catalog::claim_process(&cfg.database_url)?;
            // Refuse to run broken: a damaged database is not served from.
            manager::catalog::quick_check(&cfg.database_url)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{e:#}\nThe database in {} is damaged; the manager will not serve from it. \
                         Move that folder aside and restore the newest verified backup from the nodes: \
                         `manager backup restore --node <node url> ... --data-dir <new folder> --write-config <file>` \
                         with the recovery key (docs/backup.md).",
                        cfg.data_dir.display()
                    )
                })?;
            manager::serve(cfg).await
        }
        Command::CreateUser {
            email,
            role,
            generate_password,
        } => {
            let password = if generate_password {
                auth::random_token()[..20].to_string()
            } else {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s.trim_end_matches(['\r', '\n']).to_string()
            };
            anyhow::ensure!(
                password.chars().count() >= 10,
                "a password has at least 10 characters"
            );
            let email = email.trim().to_lowercase();
            anyhow::ensure!(email.contains('@'), "`--email` must be an email address");
            let db = open_db(&cfg).await?;
            let hash = auth::hash_password(&password)?;
            let role: manager::domain::Role = role.parse().map_err(anyhow::Error::msg)?;
            // No signup bonus: an operator made this account by hand.
            db.create_account(&email, &hash, role, 0)
                .await
                .map_err(|e| match e {
                    TxError::Refused(Refused::EmailTaken) => {
                        anyhow::anyhow!("an account for {email} already exists")
                    }
                    e => e.into(),
                })?;
            if generate_password {
                println!("{password}");
            }
            eprintln!("created {role} {email}");
            Ok(())
        }
        Command::CreateToken { email, label } => {
            let db = open_db(&cfg).await?;
            let user = db
                .user_by_email(&email.trim().to_lowercase())
                .await?
                .ok_or_else(|| anyhow::anyhow!("no account for {email}"))?;
            let token = format!("slm_{}", auth::random_token());
            db.insert_api_token(&auth::token_hash(&token), user.id, &label)
                .await?;
            println!("{token}");
            Ok(())
        }
        Command::TranscoderToken { by } => {
            let db = open_db(&cfg).await?;
            println!(
                "{}",
                manager::runners::new_registration_token(&*db, &format!("cli:{by}")).await?
            );
            Ok(())
        }
        Command::TranscoderRevoke { name } => {
            let db = open_db(&cfg).await?;
            if !manager::runners::revoke(&*db, &name).await? {
                anyhow::bail!("no live transcode worker is named {name}");
            }
            println!("revoked {name}");
            Ok(())
        }
        Command::GrantCredits {
            email,
            created_before,
            amount,
            reason,
            by,
            key,
        } => {
            let db = open_db(&cfg).await?;
            let fail = |e: manager::ledger::LedgerError| {
                let e = manager::ApiError::from(e);
                anyhow::anyhow!("{}: {e}", e.code())
            };
            let amount = manager::ledger::parse_amount_text(&amount).map_err(fail)?;
            let to = match (email, created_before) {
                (Some(email), None) => {
                    let user = db
                        .user_by_email(&email.trim().to_lowercase())
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("no account for {email}"))?;
                    manager::ledger::Recipients::Account(user.id)
                }
                (None, Some(t)) => manager::ledger::Recipients::CreatedBefore(t),
                _ => anyhow::bail!("give exactly one of --email or --created-before"),
            };
            let key = key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let done =
                manager::ledger::grant(&*db, &to, amount, &format!("operator:{by}"), &reason, &key)
                    .await
                    .map_err(fail)?;
            println!("{}", done.len());
            eprintln!("granted {amount} credits to {} account(s)", done.len());
            Ok(())
        }
        Command::InitCluster { .. }
        | Command::Backup { .. }
        | Command::MediaProbe { .. }
        | Command::MediaTranscode { .. } => {
            unreachable!("handled above")
        }
    }
}

async fn open_db(cfg: &Config) -> anyhow::Result<catalog::SharedCatalog> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    catalog::open(&cfg.database_url).await
}

fn hex32() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Writes `manager.toml` and `viewnode-<name>.toml` under `dir`. Each file
/// holds secrets, so it is created readable by its owner only.
/// A node's TLS port under `init-cluster --tls`: its listen port + 10.
const TLS_PORT_OFFSET: u16 = 10;

fn init_cluster(
    dir: &std::path::Path,
    listen: &str,
    nodes: &[String],
    tls: bool,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let ca = if tls {
        let ca = shared::tls::ClusterCa::generate(&dir.display().to_string())?;
        write_private(&dir.join("cluster-ca.key"), &ca.key_pem())?;
        write_private(&dir.join("cluster-ca.pem"), &ca.cert_pem())?;
        Some(ca)
    } else {
        None
    };
    let master = hex32();
    let signer = shared::TokenSigner::generate();
    // Seals the off-machine database backups; nodes get only a read
    // credential derived from it (docs/backup.md).
    let recovery = manager::backup::RecoveryKey::generate();
    let mut mgr = format!(
        "# Written by `manager init-cluster`. Holds secrets: keep it private.\n\
         listen = \"{listen}\"\n\
         data_dir = \"{}\"\n\
         master_key_id = 1\n\
         master_key = \"{master}\"\n\
         token_signing_key = \"{}\"\n",
        dir.join("manager").display(),
        signer.seed_hex(),
    );
    if let Some(ca) = &ca {
        // Inline (a top-level key, before the tables), so backups of the
        // configuration carry it to a restore.
        write!(mgr, "node_ca_cert = \"\"\"\n{}\"\"\"\n", ca.cert_pem())?;
    }
    for spec in nodes {
        let mut it = spec.splitn(4, ':');
        let (Some(name), Some(lat), Some(lon), Some(addr)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            anyhow::bail!("`--node {spec}`: expected name:lat:lon:listen");
        };
        let lat: f64 = lat
            .parse()
            .map_err(|_| anyhow::anyhow!("`--node {spec}`: bad latitude"))?;
        let lon: f64 = lon
            .parse()
            .map_err(|_| anyhow::anyhow!("`--node {spec}`: bad longitude"))?;
        let secret = hex32();
        // With TLS: the manager calls the node's TLS port; viewers keep
        // the plain one (their players would not trust the cluster CA).
        let (url, public, tls_lines) = match &ca {
            None => (format!("http://{addr}"), String::new(), String::new()),
            Some(ca) => {
                let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
                    anyhow::anyhow!("`--node {spec}`: with --tls, listen is ip:port")
                })?;
                // The certificate names the address the manager dials.
                anyhow::ensure!(
                    !sock.ip().is_unspecified(),
                    "`--node {spec}`: with --tls, listen on the address the manager reaches the node at, not {}",
                    sock.ip()
                );
                let tls_addr = std::net::SocketAddr::new(
                    sock.ip(),
                    sock.port().checked_add(TLS_PORT_OFFSET).ok_or_else(|| {
                        anyhow::anyhow!("`--node {spec}`: no room for the TLS port (+10)")
                    })?,
                );
                let issued = ca.issue(name, &[sock.ip().to_string()])?;
                let (cert, key) = (
                    dir.join(format!("viewnode-{name}.crt")),
                    dir.join(format!("viewnode-{name}.key")),
                );
                write_private(&cert, &issued.cert_pem)?;
                write_private(&key, &issued.key_pem)?;
                (
                    format!("https://{tls_addr}"),
                    format!("public_url = \"http://{addr}\"\n"),
                    format!(
                        "tls_listen = \"{tls_addr}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                        cert.display(),
                        key.display()
                    ),
                )
            }
        };
        write!(
            mgr,
            "\n[[nodes]]\nname = \"{name}\"\nurl = \"{url}\"\n{public}lat = {lat}\nlon = {lon}\nweight = 1\nsecret = \"{secret}\"\n"
        )?;
        let node = format!(
            "# Written by `manager init-cluster`. Holds secrets: keep it private.\n\
             name = \"{name}\"\n\
             listen = \"{addr}\"\n\
             storage_dir = \"{}\"\n\
             master_key_id = 1\n\
             master_key = \"{master}\"\n\
             token_public_key = \"{}\"\n\
             manager_secret = \"{secret}\"\n\
             manager_url = \"http://{listen}\"\n\
             backup_read_key = \"{}\"\n{tls_lines}",
            dir.join(format!("node-{name}")).display(),
            signer.public_hex(),
            recovery.read_secret_hex().expose(),
        );
        write_private(&dir.join(format!("viewnode-{name}.toml")), &node)?;
    }
    write!(
        mgr,
        "\n[backup]\nrecovery_key = \"{}\"\n",
        recovery.encode().expose()
    )?;
    write_private(&dir.join("manager.toml"), &mgr)?;
    eprintln!(
        "wrote configuration for the manager and {} node(s) in {}",
        nodes.len(),
        dir.display()
    );
    // The recovery key alone on stdout, shown this once: with the node
    // addresses it is all a restore on an empty machine needs.
    println!("{}", recovery.encode().expose());
    eprintln!(
        "the line above is the RECOVERY KEY: keep it off this machine (password manager, \
         paper in a safe). `manager backup restore` asks for it when this machine is gone."
    );
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (refusing to overwrite existing secrets)",
                path.display()
            )
        })?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
