//! mb-backup: one archive with an installation's state (configuration overrides,
//! policies, accounts and aliases, bans and trusts, recipients, greylist, web accounts
//! and API keys, the DKIM key; optionally the cluster state and the quarantine), and its
//! restore into an empty installation on any of the three database engines.

mod archive;
mod files;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use mb_core::Config;
use mb_proto::v1::backup_chunk::Item;
use mb_proto::v1::backup_client::BackupClient;
use mb_proto::v1::backup_value::Kind as WireKind;
use mb_proto::v1::{
    BackupChunk, BackupEnd, BackupExportRequest, BackupHeader, BackupRow, BackupRows, BackupTable,
    BackupValue,
};
use mb_runtime::cli::{self, Failure};
use serde_json::{Value as Json, json};

use crate::archive::{ArchiveError, FileInfo, FileKind, Includes, Manifest, Part, TableInfo};
use crate::files::Plan;

const AFTER_HELP: &str = "\
create asks mb-rpcd for the database's state (one consistent snapshot) and writes it,
with the DKIM key (dkim.key) and the key that seals web TOTP secrets
(paths.data_dir/web-totp.key), into FILE (a gzip-compressed tar, mode 0600: it holds
password hashes and private keys). --with-cluster adds paths.data_dir/cluster (the
node's certificates and keys, the cluster CA, the node table), --with-quarantine the
quarantine index and its messages. The message log and web sessions are not carried.

restore reads the whole archive first and refuses a damaged, truncated or newer one
before changing anything; then mb-rpcd imports the rows in one transaction, refused
unless every table it restores into is empty; then the files are put back with their
modes (and owners, as root). A file already there with the same content is left alone,
a different one is replaced only with --force.

Moving from SQLite to a shared database (MariaDB or PostgreSQL):
  mb-backup create /root/mailborder.mbk
  systemctl stop mailborder.target
  (set database.url in /etc/mailborder/mailborder.toml to the new, empty database)
  systemctl start mb-rpcd
  mb-backup restore /root/mailborder.mbk
  systemctl start mailborder.target

Examples:
  mb-backup create /root/mailborder.mbk
  mb-backup create --with-cluster --with-quarantine /srv/backup/mx1.mbk
  mb-backup inspect /root/mailborder.mbk
  mb-backup --json restore /root/mailborder.mbk

Exit status: 0 success, 1 refused (the installation is not empty, a different file is
in the way, FILE exists), 2 usage error, 65 the archive is damaged, truncated, not an
archive or from a newer version, 66 FILE cannot be read, 69 mb-rpcd could not be
reached, 73 FILE cannot be written, 74 a key or message file cannot be read or written,
77 permission denied (run it as root or as the mailborder user).";

/// Largest message exchanged with mb-rpcd (a batch of rows).
const MAX_MESSAGE: usize = 64 << 20;

/// Rows per import message, and at most about this many bytes.
const BATCH_ROWS: usize = 500;
const BATCH_BYTES: usize = 1 << 20;

/// Back up an installation's state into one archive, and restore it.
#[derive(Parser)]
#[command(name = "mb-backup", version, after_help = AFTER_HELP)]
struct Args {
    /// Configuration file, for paths.* and dkim.key [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print what was written or restored as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a backup of this installation into FILE
    Create {
        file: PathBuf,
        /// Also the cluster state (paths.data_dir/cluster: certificates, keys, node table)
        #[arg(long)]
        with_cluster: bool,
        /// Also the quarantine: its index and every quarantined message
        #[arg(long)]
        with_quarantine: bool,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
    },
    /// Restore FILE into this (empty) installation
    Restore {
        file: PathBuf,
        /// Replace key and message files that exist with a different content
        #[arg(long)]
        force: bool,
        /// Put back only the files (after a restore whose files could not be written)
        #[arg(long)]
        files_only: bool,
    },
    /// Check FILE end to end and show what it holds
    Inspect { file: PathBuf },
}

fn main() -> ExitCode {
    let args = mb_runtime::docs::parse::<Args>();
    cli::run("mb-backup", run(args))
}

async fn run(args: Args) -> Result<(), Failure> {
    let cfg = mb_runtime::load_config_for_tool("mb-backup", args.config.as_deref());
    let report = match args.command {
        Command::Create {
            file,
            with_cluster,
            with_quarantine,
            force,
        } => create(&cfg, &file, with_cluster, with_quarantine, force).await?,
        Command::Restore {
            file,
            force,
            files_only,
        } => restore(&cfg, &file, force, files_only).await?,
        Command::Inspect { file } => {
            let (m, _) = check(&cfg, &file)?;
            describe(&m)
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        mb_runtime::say!("{}", summary(&report));
    }
    Ok(())
}

fn progress(text: std::fmt::Arguments<'_>) {
    eprintln!("mb-backup: {text}");
}

fn archive_failure(file: &Path, e: ArchiveError) -> Failure {
    let code = match e {
        ArchiveError::Io(_) => 66,
        _ => 65,
    };
    // Every reading of an archive comes before a restore changes anything.
    Failure(
        code,
        anyhow!("{}: {e}; nothing was changed", file.display()),
    )
}

fn grpc(e: tonic::Status) -> Failure {
    cli::grpc("mb-rpcd", &e)
}

fn rows(n: u64) -> String {
    format!("{n} row{}", if n == 1 { "" } else { "s" })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// One table being received from mb-rpcd: its rows spooled to an unnamed file.
struct Spool {
    info: TableInfo,
    file: BufWriter<fs::File>,
    bytes: u64,
}

fn json_value(v: BackupValue) -> Json {
    match v.kind {
        None | Some(WireKind::Null(_)) => Json::Null,
        Some(WireKind::Int(i)) => json!(i),
        Some(WireKind::Real(f)) => json!(f),
        Some(WireKind::Text(s)) => Json::String(s),
    }
}

fn wire_value(v: &Json) -> Option<BackupValue> {
    let kind = match v {
        Json::Null => WireKind::Null(true),
        Json::Number(n) => match n.as_i64() {
            Some(i) => WireKind::Int(i),
            None => WireKind::Real(n.as_f64()?),
        },
        Json::String(s) => WireKind::Text(s.clone()),
        _ => return None,
    };
    Some(BackupValue { kind: Some(kind) })
}

async fn create(
    cfg: &Config,
    file: &Path,
    with_cluster: bool,
    with_quarantine: bool,
    force: bool,
) -> Result<Json, Failure> {
    if file.exists() && !force {
        return Err(Failure::refused(anyhow!(
            "{} exists: name another file, or add --force to replace it",
            file.display()
        )));
    }
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cant_create =
        |e: std::io::Error| Failure(73, anyhow!("cannot write {}: {e}", file.display()));
    let mut client = BackupClient::new(cli::rpcd(cfg).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    progress(format_args!("reading the database through mb-rpcd"));
    let mut stream = client
        .export(BackupExportRequest { with_quarantine })
        .await
        .map_err(grpc)?
        .into_inner();
    let mut header: Option<BackupHeader> = None;
    let mut spools: BTreeMap<String, Spool> = BTreeMap::new();
    let mut order = Vec::new();
    let mut overrides: Vec<(String, String)> = Vec::new();
    let totals = loop {
        let Some(chunk) = stream.message().await.map_err(grpc)? else {
            return Err(Failure(
                69,
                anyhow!(
                    "mb-rpcd ended the export early; nothing was written: see its log, then try again"
                ),
            ));
        };
        match chunk.item {
            Some(Item::Header(h)) => {
                for t in &h.tables {
                    let f = tempfile::tempfile_in(&dir).map_err(cant_create)?;
                    order.push(t.name.clone());
                    spools.insert(
                        t.name.clone(),
                        Spool {
                            info: TableInfo {
                                name: t.name.clone(),
                                columns: t.columns.clone(),
                                rows: 0,
                            },
                            file: BufWriter::new(f),
                            bytes: 0,
                        },
                    );
                }
                header = Some(h);
            }
            Some(Item::Rows(r)) => {
                let Some(s) = spools.get_mut(&r.table) else {
                    return Err(Failure(
                        69,
                        anyhow!("mb-rpcd sent rows of {} it did not announce", r.table),
                    ));
                };
                let key = s.info.columns.iter().position(|c| c == "cfg_key");
                let value = s.info.columns.iter().position(|c| c == "cfg_value");
                for row in r.rows {
                    let values: Vec<Json> = row.values.into_iter().map(json_value).collect();
                    if r.table == "config_overrides"
                        && let (Some(k), Some(v)) = (key, value)
                        && let (Some(k), Some(v)) = (values[k].as_str(), values[v].as_str())
                    {
                        overrides.push((k.to_string(), v.to_string()));
                    }
                    let line = archive::row_line(&values);
                    s.file.write_all(line.as_bytes()).map_err(cant_create)?;
                    s.bytes += line.len() as u64;
                    s.info.rows += 1;
                }
            }
            Some(Item::End(e)) => break e.rows,
            None => {}
        }
    };
    let Some(header) = header else {
        return Err(Failure(69, anyhow!("mb-rpcd's export had no header")));
    };
    for name in &order {
        let s = &spools[name];
        if totals.get(name).copied().unwrap_or(0) != s.info.rows {
            return Err(Failure(
                69,
                anyhow!("mb-rpcd's export of {name} is incomplete; nothing was written: try again"),
            ));
        }
        progress(format_args!("{name}: {}", rows(s.info.rows)));
    }

    // The files, where the daemons find them: the file's settings with the database's
    // overrides on top.
    let mut effective = cfg.clone();
    effective.apply_overrides(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let io_failure = |e: files::FileError| Failure(74, anyhow!("cannot read {e}"));
    let mut taken: Vec<(FileInfo, PathBuf)> = Vec::new();
    let mut includes = Includes {
        cluster: with_cluster,
        quarantine: with_quarantine,
        ..Default::default()
    };
    for (kind, name) in [
        (FileKind::Dkim, "private.key"),
        (FileKind::WebTotp, "web-totp.key"),
    ] {
        let path = files::target(&effective, kind, name);
        if path.exists() {
            taken.push((
                files::describe(kind, name, &path).map_err(io_failure)?,
                path,
            ));
            match kind {
                FileKind::Dkim => includes.dkim_key = true,
                _ => includes.web_totp_key = true,
            }
        } else if kind == FileKind::Dkim {
            progress(format_args!(
                "no DKIM key at {} (dkim.key): none included",
                path.display()
            ));
        }
    }
    for (wanted, kind, what) in [
        (with_cluster, FileKind::Cluster, "--with-cluster"),
        (with_quarantine, FileKind::Quarantine, "--with-quarantine"),
    ] {
        if !wanted {
            continue;
        }
        let root = files::target(&effective, kind, "");
        if kind == FileKind::Cluster && !root.is_dir() {
            return Err(Failure::refused(anyhow!(
                "there is no cluster state in {} (this node is in no cluster): leave out {what}",
                root.display()
            )));
        }
        let names = if root.is_dir() {
            files::walk(&root).map_err(io_failure)?
        } else {
            Vec::new()
        };
        let mut bytes = 0;
        for name in names {
            let path = root.join(&name);
            let info = files::describe(kind, &name, &path).map_err(io_failure)?;
            bytes += info.size;
            taken.push((info, path));
        }
        progress(format_args!(
            "{}: {} files, {bytes} bytes",
            kind.dir(),
            taken.iter().filter(|(i, _)| i.kind == kind).count()
        ));
    }

    let created_unix = now();
    let manifest = Manifest {
        format: archive::FORMAT,
        product: "mailborder".into(),
        product_version: env!("CARGO_PKG_VERSION").into(),
        created_unix,
        created: mb_runtime::logging::timestamp(SystemTime::now()),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        source_engine: header.engine.clone(),
        row_format: header.format,
        includes,
        tables: order.iter().map(|n| spools[n].info.clone()).collect(),
        files: taken.iter().map(|(i, _)| i.clone()).collect(),
    };

    // Written beside FILE and renamed onto it once complete and on disk.
    let name = file
        .file_name()
        .map_or_else(|| "backup".into(), |n| n.to_string_lossy().into_owned());
    let partial = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let written = (|| -> Result<u64, Failure> {
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(cant_create)?;
        let mut w = archive::Writer::new(BufWriter::new(out), &manifest).map_err(cant_create)?;
        for n in &order {
            let s = spools
                .remove(n)
                .unwrap_or_else(|| unreachable!("announced"));
            let mut f = s
                .file
                .into_inner()
                .map_err(|e| cant_create(e.into_error()))?;
            f.rewind().map_err(cant_create)?;
            w.table(n, s.bytes, f).map_err(cant_create)?;
        }
        for (info, path) in &taken {
            let data = files::open(path, info.size).map_err(io_failure)?;
            w.file(info, data).map_err(cant_create)?;
        }
        let out = w.finish().map_err(cant_create)?;
        let out = out.into_inner().map_err(|e| cant_create(e.into_error()))?;
        out.sync_all().map_err(cant_create)?;
        let size = out.metadata().map_err(cant_create)?.len();
        fs::rename(&partial, file).map_err(cant_create)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(size)
    })();
    let size = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    progress(format_args!("wrote {} ({size} bytes)", file.display()));
    let mut report = describe(&manifest);
    report["file"] = json!(file.display().to_string());
    report["bytes"] = json!(size);
    Ok(report)
}

/// What an archive holds, for `--json` and the summary line.
fn describe(m: &Manifest) -> Json {
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &m.files {
        *kinds.entry(f.kind.dir()).or_default() += 1;
    }
    json!({
        "format": m.format,
        "product_version": m.product_version,
        "created": m.created,
        "created_unix": m.created_unix,
        "host": m.host,
        "source_engine": m.source_engine,
        "includes": m.includes,
        "tables": m.tables.iter().map(|t| (t.name.clone(), json!(t.rows))).collect::<serde_json::Map<_, _>>(),
        "files": kinds,
    })
}

fn summary(r: &Json) -> String {
    let rows: u64 = r["tables"]
        .as_object()
        .map_or(0, |t| t.values().filter_map(Json::as_u64).sum());
    let files = r["files"]
        .as_object()
        .map(|f| {
            f.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into());
    let mut text = format!(
        "{} rows in {} tables from {} (mailborder {}, {} UTC); files: {files}",
        rows,
        r["tables"].as_object().map_or(0, serde_json::Map::len),
        r["source_engine"].as_str().unwrap_or("?"),
        r["product_version"].as_str().unwrap_or("?"),
        r["created"].as_str().unwrap_or("?"),
    );
    if let Some(f) = r["file"].as_str() {
        text = format!("{f}: {text}");
    }
    if let Some(w) = r.get("restored") {
        text.push_str(&format!(
            "; restored: {} files written, {} already in place; configuration generation {}",
            w["written"], w["unchanged"], w["config_generation"]
        ));
    }
    text
}

/// A file of the archive and what restoring it does.
struct Planned {
    path: PathBuf,
    plan: Plan,
}

/// Pass one: the whole archive read and checked, the overrides it carries, and what
/// restoring each file would do on this installation.
fn check(cfg: &Config, file: &Path) -> Result<(Manifest, BTreeMap<String, Planned>), Failure> {
    let input = fs::File::open(file)
        .map_err(|e| Failure(66, anyhow!("cannot read {}: {e}", file.display())))?;
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut plans = BTreeMap::new();
    let mut file_error = None;
    let manifest = archive::read(std::io::BufReader::new(input), |_, part| {
        match part {
            Part::Rows { table, rows } if table.name == "config_overrides" => {
                let k = table.columns.iter().position(|c| c == "cfg_key");
                let v = table.columns.iter().position(|c| c == "cfg_value");
                for row in rows {
                    let row = row?;
                    if let (Some(k), Some(v)) = (k, v)
                        && let (Some(k), Some(v)) = (row[k].as_str(), row[v].as_str())
                    {
                        overrides.push((k.to_string(), v.to_string()));
                    }
                }
            }
            Part::Rows { .. } => {}
            Part::File { info, data } => {
                // The overrides come before the files in every archive.
                let mut effective = cfg.clone();
                effective.apply_overrides(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let path = files::target(&effective, info.kind, &info.name);
                let mut content = Vec::new();
                data.read_to_end(&mut content)?;
                match files::plan(&path, &content) {
                    Ok(plan) => {
                        plans.insert(info.member(), Planned { path, plan });
                    }
                    Err(e) => file_error = Some(e),
                }
            }
        }
        Ok(())
    })
    .map_err(|e| archive_failure(file, e))?;
    if let Some(e) = file_error {
        return Err(Failure(74, anyhow!("cannot read {e}")));
    }
    Ok((manifest, plans))
}

async fn restore(
    cfg: &Config,
    file: &Path,
    force: bool,
    files_only: bool,
) -> Result<Json, Failure> {
    progress(format_args!("checking {}", file.display()));
    let (manifest, plans) = check(cfg, file)?;
    let differing: Vec<String> = plans
        .values()
        .filter(|p| p.plan == Plan::Differs)
        .map(|p| p.path.display().to_string())
        .collect();
    if !differing.is_empty() && !force {
        return Err(Failure::refused(anyhow!(
            "these files exist with a different content: {}; move them away, or add --force to replace them (nothing was restored)",
            differing.join(", ")
        )));
    }
    progress(format_args!(
        "{} from {} ({} UTC), taken from a {} database",
        file.display(),
        manifest.host,
        manifest.created,
        manifest.source_engine
    ));
    let imported = if files_only {
        Default::default()
    } else {
        import(cfg, file, &manifest).await?
    };
    put_files(file, &manifest, &plans, imported)
}

/// Pass two: the rows, streamed to mb-rpcd, which keeps them only if the stream ends
/// with the totals.
async fn import(
    cfg: &Config,
    file: &Path,
    manifest: &Manifest,
) -> Result<mb_proto::v1::BackupImportResponse, Failure> {
    progress(format_args!("restoring the database through mb-rpcd"));

    let mut client = BackupClient::new(cli::rpcd(cfg).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = tokio::sync::mpsc::channel::<BackupChunk>(8);
    let path = file.to_path_buf();
    let m = manifest.clone();
    // Set when mb-rpcd stopped reading (it refused the import): its answer says why.
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone = stopped.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), Failure> {
        let send = |item: Item| {
            tx.blocking_send(BackupChunk { item: Some(item) })
                .map_err(|_| {
                    gone.store(true, std::sync::atomic::Ordering::SeqCst);
                    ArchiveError::Invalid("mb-rpcd stopped reading".into())
                })
        };
        send(Item::Header(BackupHeader {
            format: m.row_format,
            engine: m.source_engine.clone(),
            product_version: m.product_version.clone(),
            tables: m
                .tables
                .iter()
                .map(|t| BackupTable {
                    name: t.name.clone(),
                    columns: t.columns.clone(),
                })
                .collect(),
        }))
        .map_err(|e| archive_failure(&path, e))?;
        let input = fs::File::open(&path)
            .map_err(|e| Failure(66, anyhow!("cannot read {}: {e}", path.display())))?;
        archive::read(std::io::BufReader::new(input), |_, part| {
            let Part::Rows { table, rows } = part else {
                return Ok(());
            };
            let mut batch = Vec::new();
            let mut bytes = 0;
            for row in rows {
                let row = row?;
                let mut values = Vec::with_capacity(row.len());
                for v in &row {
                    bytes += v.as_str().map_or(8, str::len);
                    values.push(wire_value(v).ok_or_else(|| {
                        ArchiveError::Invalid(format!("a value of {} is {v}", table.name))
                    })?);
                }
                batch.push(BackupRow { values });
                if batch.len() >= BATCH_ROWS || bytes >= BATCH_BYTES {
                    send(Item::Rows(BackupRows {
                        table: table.name.clone(),
                        rows: std::mem::take(&mut batch),
                    }))?;
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                send(Item::Rows(BackupRows {
                    table: table.name.clone(),
                    rows: batch,
                }))?;
            }
            Ok(())
        })
        .map_err(|e| archive_failure(&path, e))?;
        // Only a complete archive ends with the totals: without them mb-rpcd rolls back.
        send(Item::End(BackupEnd {
            rows: m.tables.iter().map(|t| (t.name.clone(), t.rows)).collect(),
        }))
        .map_err(|e| archive_failure(&path, e))?;
        Ok(())
    });
    let imported = client
        .import(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let read = reader
        .await
        .map_err(|e| Failure(70, anyhow!("the archive reader failed: {e}")))?;
    let imported = match (imported, read) {
        (Ok(r), Ok(())) => r.into_inner(),
        (Err(s), Err(_)) if stopped.load(std::sync::atomic::Ordering::SeqCst) => {
            return Err(grpc(s));
        }
        // The archive changed or broke since it was checked: that is the cause.
        (_, Err(e)) => return Err(e),
        (Err(s), Ok(())) => return Err(grpc(s)),
    };
    for t in &manifest.tables {
        progress(format_args!(
            "{}: {} restored",
            t.name,
            rows(imported.rows.get(&t.name).copied().unwrap_or(0))
        ));
    }
    Ok(imported)
}

/// Pass three: the files, each as planned by the first pass.
fn put_files(
    file: &Path,
    manifest: &Manifest,
    plans: &BTreeMap<String, Planned>,
    imported: mb_proto::v1::BackupImportResponse,
) -> Result<Json, Failure> {
    let (mut written, mut unchanged) = (0u64, 0u64);
    let mut failed = None;
    let input = fs::File::open(file)
        .map_err(|e| Failure(66, anyhow!("cannot read {}: {e}", file.display())))?;
    archive::read(std::io::BufReader::new(input), |_, part| {
        let Part::File { info, data } = part else {
            return Ok(());
        };
        let Some(p) = plans.get(&info.member()) else {
            return Ok(());
        };
        if p.plan == Plan::Same {
            unchanged += 1;
            return Ok(());
        }
        let mut content = Vec::new();
        data.read_to_end(&mut content)?;
        match files::put(&p.path, info, &content) {
            Ok(()) => written += 1,
            Err(e) => {
                if failed.is_none() {
                    failed = Some(e);
                }
            }
        }
        Ok(())
    })
    .map_err(|e| {
        Failure(
            65,
            anyhow!(
                "{}: {e}; the database was restored, the files were not all put back: once the archive reads again, mb-backup restore --files-only FILE",
                file.display()
            ),
        )
    })?;
    if let Some(e) = failed {
        return Err(Failure(
            74,
            anyhow!(
                "the database was restored, but a file was not: cannot write {e}; fix that and then put the files back with: mb-backup restore --files-only --force FILE"
            ),
        ));
    }
    progress(format_args!(
        "files: {written} written, {unchanged} already in place; restart the daemons so that every one reads the restored state"
    ));
    let mut report = describe(manifest);
    report["file"] = json!(file.display().to_string());
    report["restored"] = json!({
        "tables": imported.rows,
        "written": written,
        "unchanged": unchanged,
        "config_generation": imported.config_generation,
    });
    Ok(report)
}
