//! The `Dkim` service: the record that publishes the node's DKIM key (`dkim.key`,
//! `dkim.selector`) and making a new key, for mb-web's `/api/v1/dkim`, which may write
//! no file itself. The key and record code is `mb_dkim`'s, shared with the `mb-dkim`
//! tool, so the file, its mode and the refusals are the same either way.
//!
//! A new key is recorded in the configuration audit trail (`dkim-key:PATH`, action
//! `keygen` or `replace`, the public key's fingerprint as the value), in the same
//! transaction that is committed only once the file is in place. A cluster child takes
//! its key from the main (`replica.rs` writes the main's key at each import while
//! `dkim.sign` is on there), so it refuses to make its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mb_dkim::{DkimError, Key, Record};
use mb_proto::v1::dkim_server::{Dkim, DkimServer};
use mb_proto::v1::{DkimKey, DkimKeygenRequest, DkimRecordRequest};
use mb_runtime::uds::{Caller, caller};
use tonic::{Request, Response, Status};

use crate::db::{AuditLine, DbError};
use crate::store::Store;

/// The service, for `lib.rs` to register on the local socket behind `guard`.
pub fn server<G: tonic::service::Interceptor>(
    store: Arc<Store>,
    guard: G,
) -> tonic::service::interceptor::InterceptedService<DkimServer<DkimService>, G> {
    tonic::service::interceptor::InterceptedService::new(
        DkimServer::new(DkimService {
            store,
            keygen: Arc::new(tokio::sync::Mutex::new(())),
        }),
        guard,
    )
}

pub struct DkimService {
    store: Arc<Store>,
    /// One key generation at a time: two forced ones would otherwise race to the file
    /// and the audit trail could name the loser.
    keygen: Arc<tokio::sync::Mutex<()>>,
}

/// The node's selector and key file, from the effective configuration.
fn settings(store: &Store) -> Result<(String, PathBuf, bool), Status> {
    let cfg = store.effective();
    let selector = cfg.text("dkim.selector");
    mb_dkim::check_selector(&selector).map_err(|e| {
        Status::failed_precondition(format!(
            "dkim.selector: {e}; set one with mb-config set dkim.selector NAME"
        ))
    })?;
    Ok((selector, cfg.path("dkim.key"), cfg.bool("dkim.sign")))
}

/// The one place `DkimError` becomes a gRPC status.
fn dkim_status(e: DkimError) -> Status {
    match e {
        DkimError::Domain(_) | DkimError::Selector(_) | DkimError::Bits(_) => {
            Status::invalid_argument(e.to_string())
        }
        DkimError::Exists(_) => Status::already_exists(e.to_string()),
        DkimError::Missing { .. } => Status::not_found(e.to_string()),
        DkimError::NotAKey { .. } => Status::failed_precondition(e.to_string()),
        DkimError::Read { .. }
        | DkimError::Generate(_)
        | DkimError::CreateDir { .. }
        | DkimError::Write { .. } => {
            tracing::error!(cause = %e, "DKIM key");
            Status::internal(e.to_string())
        }
    }
}

fn db_status(e: DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(format!("{e}; the key was not changed"))
}

fn wire(selector: &str, path: &std::path::Path, domain: &str, key: &Key, signing: bool) -> DkimKey {
    let record = Record::new(selector, domain, key);
    DkimKey {
        selector: selector.to_string(),
        key_path: path.display().to_string(),
        algorithm: key.algorithm().to_string(),
        bits: key.bits(),
        zone_line: record.zone_line(),
        name: record.name,
        value: record.value,
        fingerprint: key.fingerprint(),
        signing,
        replaced: false,
    }
}

/// Runs blocking key work (reading, generating, writing files) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DkimError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("DKIM key task failed: {e}")))?
        .map_err(dkim_status)
}

#[tonic::async_trait]
impl Dkim for DkimService {
    async fn record(&self, req: Request<DkimRecordRequest>) -> Result<Response<DkimKey>, Status> {
        let domain = mb_dkim::check_domain(&req.into_inner().domain).map_err(dkim_status)?;
        let (selector, path, signing) = settings(&self.store)?;
        let key = blocking({
            let path = path.clone();
            move || Key::read(&path)
        })
        .await?;
        Ok(Response::new(wire(
            &selector, &path, &domain, &key, signing,
        )))
    }

    async fn keygen(&self, req: Request<DkimKeygenRequest>) -> Result<Response<DkimKey>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let domain = mb_dkim::check_domain(&r.domain).map_err(dkim_status)?;
        let bits = if r.bits == 0 {
            mb_dkim::DEFAULT_BITS
        } else {
            r.bits
        };
        if !mb_dkim::SIZES.contains(&bits) {
            return Err(dkim_status(DkimError::Bits(bits)));
        }
        if let Some(main) = self.store.cluster_main() {
            return Err(Status::failed_precondition(format!(
                "this node is a cluster child: it takes its DKIM key from the main node ({main}); make the key there"
            )));
        }
        let (selector, path, signing) = settings(&self.store)?;
        // The rest runs as a task of its own: a caller that gives up (mb-web's deadline)
        // cannot cut it between the file and the commit.
        let job = make_key(
            self.store.clone(),
            self.keygen.clone(),
            path.clone(),
            selector.clone(),
            bits,
            r.force,
            who,
        );
        let (key, replaced) = tokio::spawn(job)
            .await
            .map_err(|e| Status::internal(format!("DKIM key task failed: {e}")))??;
        let mut out = wire(&selector, &path, &domain, &key, signing);
        out.replaced = replaced;
        Ok(Response::new(out))
    }
}

/// Makes the key, writes it and its audit line; returns it and whether it replaced one.
async fn make_key(
    store: Arc<Store>,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    path: PathBuf,
    selector: String,
    bits: u32,
    force: bool,
    who: Caller,
) -> Result<(Arc<Key>, bool), Status> {
    let _one = one_at_a_time.lock_owned().await;
    // Refused before the slow part; `Key::write` checks again atomically.
    if !force && path.exists() {
        return Err(dkim_status(DkimError::Exists(path)));
    }
    let old = blocking({
        let path = path.clone();
        move || Ok(Key::read(&path).ok().map(|k| k.fingerprint()))
    })
    .await?;
    let key = Arc::new(blocking(move || Key::generate(bits)).await?);

    let db = &store.db;
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let audit_key = format!("dkim-key:{}", path.display());
    let new = format!("rsa-{bits} selector={selector} {}", key.fingerprint());
    let mut tx = db.write_tx().await.map_err(|e| db_status(e.into()))?;
    db.write_audit(
        &mut tx,
        &AuditLine {
            key: &audit_key,
            action: if old.is_some() { "replace" } else { "keygen" },
            old: old.as_deref(),
            new: Some(&new),
            uid: who.uid,
            user: &who.name,
            at,
        },
    )
    .await
    .map_err(db_status)?;
    // The file first, then the commit: a refused or failed write leaves no audit line.
    let replaced = blocking({
        let (key, path) = (key.clone(), path.clone());
        move || key.write(&path, force)
    })
    .await?;
    if let Err(e) = tx.commit().await {
        tracing::error!(cause = %e, path = %path.display(), "a new DKIM key was written but its audit line was not");
        return Err(Status::unavailable(format!(
            "{} was written, but the audit trail could not record it: {e}",
            path.display()
        )));
    }
    tracing::info!(path = %path.display(), bits, selector = %selector, by = %who.name, fingerprint = %key.fingerprint(), replaced, "DKIM key generated");
    Ok((key, replaced))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;

    /// A service over a fresh SQLite database in a temp dir, `dkim.key` in it, and
    /// `extra` TOML.
    async fn service(tag: &str, extra: &str) -> (DkimService, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("mb-dkim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&format!("sqlite://{}/mb.db", dir.display()), 2)
            .await
            .expect("open");
        let toml = format!(
            "[dkim]\nselector = \"s1\"\nkey = \"{}/keys/dkim.key\"\n{extra}",
            dir.display()
        );
        let cfg = mb_core::Config::from_toml_str(&toml, "test").expect("config");
        let store = Arc::new(Store::open(db, cfg, None).await.expect("store"));
        let svc = DkimService {
            store,
            keygen: Arc::new(tokio::sync::Mutex::new(())),
        };
        (svc, dir)
    }

    fn keygen(domain: &str, force: bool) -> Request<DkimKeygenRequest> {
        Request::new(DkimKeygenRequest {
            domain: domain.into(),
            bits: 0,
            force,
        })
    }

    async fn audit_lines(svc: &DkimService) -> Vec<crate::db::AuditRecord> {
        svc.store
            .db
            .history("", 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.key.starts_with("dkim-key:"))
            .collect()
    }

    #[tokio::test]
    async fn keygen_writes_audits_and_keeps_an_existing_key_unless_forced() {
        let (svc, dir) = service("keygen", "").await;
        let none = svc
            .record(Request::new(DkimRecordRequest {
                domain: "example.org".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(none.code(), tonic::Code::NotFound, "{none:?}");

        let made = svc
            .keygen(keygen("Example.org", false))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(made.name, "s1._domainkey.example.org");
        assert_eq!((made.bits, made.replaced), (2048, false));
        let again = svc.keygen(keygen("example.org", false)).await.unwrap_err();
        assert_eq!(again.code(), tonic::Code::AlreadyExists);
        let shown = svc
            .record(Request::new(DkimRecordRequest {
                domain: "example.org".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(shown.value, made.value);
        let forced = svc
            .keygen(keygen("example.org", true))
            .await
            .unwrap()
            .into_inner();
        assert!(forced.replaced);
        assert_ne!(forced.value, made.value);

        let lines = audit_lines(&svc).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].action, "replace");
        assert_eq!(
            lines[0].old_value.as_deref(),
            Some(made.fingerprint.as_str())
        );
        assert_eq!(lines[1].action, "keygen");
        assert_eq!(
            lines[1].new_value.as_deref(),
            Some(format!("rsa-2048 selector=s1 {}", made.fingerprint).as_str())
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_key_that_cannot_be_written_leaves_no_audit_line_and_a_child_makes_none() {
        let (svc, dir) = service("unwritable", "").await;
        // The key's directory is a file: the write fails after the audit line was
        // written in the transaction, which must then not commit.
        std::fs::write(dir.join("keys"), "not a directory").unwrap();
        let e = svc.keygen(keygen("example.org", false)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert!(audit_lines(&svc).await.is_empty());
        std::fs::remove_dir_all(dir).unwrap();

        let (child, dir) = service(
            "child",
            "[cluster]\nenabled = true\nrole = \"child\"\nmain = \"main.example:10050\"\n",
        )
        .await;
        let e = child
            .keygen(keygen("example.org", false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("main.example:10050"), "{e:?}");
        assert!(!dir.join("keys/dkim.key").exists());
        assert!(audit_lines(&child).await.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
