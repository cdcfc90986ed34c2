//! Accounts for SMTP AUTH: Argon2id hashes in the database, checked here so that no
//! hash ever leaves mb-rpcd; and the sender addresses granted to each account (aliases,
//! for sender binding in mb-smtpd), returned with a successful password check.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use mb_proto::v1::users_server::Users;
use mb_proto::v1::{
    AccountAlias, AddUserRequest, AliasRequest, AliasResponse, ListAliasesRequest,
    ListAliasesResponse, ListUsersRequest, ListUsersResponse, OwnerRequest, OwnerResponse,
    RemoveUserRequest, RemoveUserResponse, SetPasswordRequest, UserInfo, VerifyRequest,
    VerifyResponse,
};
use mb_runtime::control::DaemonInfo;
use mb_runtime::uds::caller;
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::db::{Account, Db, DbError};
use crate::store::Store;

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 10;

pub struct UsersService {
    pub store: Arc<Store>,
    pub info: Arc<DaemonInfo>,
}

/// A user name: a login or an address, 1 to 191 printable ASCII characters.
fn check_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 191
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid user name {name:?}: use 1 to 191 printable characters without quotes or spaces"
        )))
    }
}

pub(crate) fn check_password(p: &str) -> Result<(), Status> {
    if p.chars().count() < MIN_PASSWORD {
        return Err(Status::invalid_argument(format!(
            "the password must have at least {MIN_PASSWORD} characters"
        )));
    }
    if p.len() > 1024 || p.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "the password must be at most 1024 bytes, without control characters",
        ));
    }
    Ok(())
}

/// Checks a name and a new password, then hashes the password.
async fn checked_hash(name: &str, password: String) -> Result<String, Status> {
    check_name(name)?;
    check_password(&password)?;
    hash_password(password).await
}

/// Hashing is CPU-bound: keep it off the async workers.
pub(crate) async fn hash_password(password: String) -> Result<String, Status> {
    tokio::task::spawn_blocking(move || {
        PasswordHasher::<PasswordHash>::hash_password(&Argon2::default(), password.as_bytes())
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| Status::internal(format!("cannot hash the password: {e}")))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn db_status(e: crate::db::DbError) -> Status {
    tracing::error!(cause = %e, "database operation failed");
    Status::unavailable(e.to_string())
}

/// A hash of a password nobody has, verified when the account does not exist so that a
/// wrong name costs as much time as a wrong password.
static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Whether `password` matches `hash`; with no hash (no such account) a dummy hash is
/// verified all the same and the answer is false. Off the async workers, like hashing.
pub(crate) async fn verify_password(
    password: String,
    hash: Option<String>,
) -> Result<bool, Status> {
    tokio::task::spawn_blocking(move || {
        let exists = hash.is_some();
        let hash = hash.unwrap_or_else(|| {
            DUMMY
                .get_or_init(|| {
                    PasswordHasher::<PasswordHash>::hash_password(
                        &Argon2::default(),
                        b"no such account: dummy password",
                    )
                    .map(|h| h.to_string())
                    .unwrap_or_default()
                })
                .clone()
        });
        PasswordVerifier::<str>::verify_password(&Argon2::default(), password.as_bytes(), &hash)
            .is_ok()
            && exists
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl Users for UsersService {
    async fn add(&self, req: Request<AddUserRequest>) -> Result<Response<UserInfo>, Status> {
        let who = caller(&req).name;
        self.store
            .refuse_on_child("SMTP AUTH accounts are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        let h = checked_hash(&r.username, r.password).await?;
        let at = now();
        if !self
            .store
            .db
            .add_user(&r.username, &h, at)
            .await
            .map_err(db_status)?
        {
            return Err(Status::already_exists(format!(
                "user {} exists; change its password with `mb-user passwd {}`",
                r.username, r.username
            )));
        }
        tracing::info!(user = %r.username, by = %who, "user added");
        Ok(Response::new(UserInfo {
            username: r.username,
            created_at_unix: at,
            updated_at_unix: at,
        }))
    }

    async fn set_password(
        &self,
        req: Request<SetPasswordRequest>,
    ) -> Result<Response<UserInfo>, Status> {
        let who = caller(&req).name;
        self.store
            .refuse_on_child("SMTP AUTH accounts are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        let h = checked_hash(&r.username, r.password).await?;
        let at = now();
        if !self
            .store
            .db
            .set_user_hash(&r.username, &h, at)
            .await
            .map_err(db_status)?
        {
            return Err(Status::not_found(format!(
                "no user {}; add it with `mb-user add {}`",
                r.username, r.username
            )));
        }
        tracing::info!(user = %r.username, by = %who, "password changed");
        Ok(Response::new(UserInfo {
            username: r.username,
            updated_at_unix: at,
            ..Default::default()
        }))
    }

    async fn remove(
        &self,
        req: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserResponse>, Status> {
        let who = caller(&req).name;
        self.store
            .refuse_on_child("SMTP AUTH accounts are cluster-wide")
            .map_err(crate::grpc::status)?;
        let name = req.into_inner().username;
        let removed = self.store.db.remove_user(&name).await.map_err(db_status)?;
        if !removed {
            return Err(Status::not_found(format!("no user {name}")));
        }
        // A later account of the same name must not inherit the old one's addresses.
        self.store
            .db
            .remove_aliases_of(&name)
            .await
            .map_err(db_status)?;
        tracing::info!(user = %name, by = %who, "user removed");
        Ok(Response::new(RemoveUserResponse { removed }))
    }

    async fn list(
        &self,
        _req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let users = self
            .store
            .db
            .list_users()
            .await
            .map_err(db_status)?
            .into_iter()
            .map(UserInfo::from)
            .collect();
        Ok(Response::new(ListUsersResponse { users }))
    }

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let r = req.into_inner();
        let stored = if check_name(&r.username).is_ok() {
            self.store
                .db
                .user_hash(&r.username)
                .await
                .map_err(db_status)?
        } else {
            None
        };
        let ok = verify_password(r.password, stored).await?;
        self.info
            .counters
            .add(if ok { "auth_ok" } else { "auth_failed" }, 1);
        // Only a successful check says which addresses the account owns.
        let addresses = if ok {
            granted(&self.store.db, &r.username)
                .await
                .map_err(db_status)?
        } else {
            Vec::new()
        };
        Ok(Response::new(VerifyResponse { ok, addresses }))
    }

    async fn add_alias(
        &self,
        req: Request<AliasRequest>,
    ) -> Result<Response<AliasResponse>, Status> {
        let who = caller(&req).name;
        self.store
            .refuse_on_child("SMTP AUTH accounts and their aliases are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        check_name(&r.username)?;
        let address = alias_address(&r.address)?;
        if self
            .store
            .db
            .user_hash(&r.username)
            .await
            .map_err(db_status)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "no user {}; add it with `mb-user add {}`",
                r.username, r.username
            )));
        }
        let changed = self
            .store
            .db
            .add_alias(&r.username, &address, now())
            .await
            .map_err(db_status)?;
        if changed {
            tracing::info!(user = %r.username, address = %address, by = %who, "sender alias added");
        }
        Ok(Response::new(AliasResponse { changed, address }))
    }

    async fn remove_alias(
        &self,
        req: Request<AliasRequest>,
    ) -> Result<Response<AliasResponse>, Status> {
        let who = caller(&req).name;
        self.store
            .refuse_on_child("SMTP AUTH accounts and their aliases are cluster-wide")
            .map_err(crate::grpc::status)?;
        let r = req.into_inner();
        let address = alias_address(&r.address)?;
        let changed = self
            .store
            .db
            .remove_alias(&r.username, &address)
            .await
            .map_err(db_status)?;
        if !changed {
            return Err(Status::not_found(format!(
                "{} has no alias {address}; see `mb-user alias list {}`",
                r.username, r.username
            )));
        }
        tracing::info!(user = %r.username, address = %address, by = %who, "sender alias removed");
        Ok(Response::new(AliasResponse { changed, address }))
    }

    async fn list_aliases(
        &self,
        req: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let user = req.into_inner().username;
        let aliases = self
            .store
            .db
            .aliases((!user.is_empty()).then_some(user.as_str()))
            .await
            .map_err(db_status)?
            .into_iter()
            .map(|(username, address, created_at_unix)| AccountAlias {
                username,
                address,
                created_at_unix,
            })
            .collect();
        Ok(Response::new(ListAliasesResponse { aliases }))
    }

    async fn owner(&self, req: Request<OwnerRequest>) -> Result<Response<OwnerResponse>, Status> {
        let r = req.into_inner();
        let username = owner(&self.store.db, &r.address)
            .await
            .map_err(db_status)?
            .unwrap_or_default();
        Ok(Response::new(OwnerResponse { username }))
    }
}

/// The account whose login or alias is exactly `address` (any case), if any.
async fn owner(db: &Db, address: &str) -> Result<Option<String>, DbError> {
    let lower = address.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Ok(None);
    }
    for login in [address.trim(), lower.as_str()] {
        if check_name(login).is_ok() && db.user_hash(login).await?.is_some() {
            return Ok(Some(login.to_string()));
        }
    }
    db.alias_owner(&lower).await
}

/// The sender addresses an account may use: its login when that is an address, then
/// its aliases, all lowercase.
async fn granted(db: &Db, username: &str) -> Result<Vec<String>, DbError> {
    let mut out = Vec::new();
    if let Some((local, domain)) = username.rsplit_once('@')
        && !local.is_empty()
        && !domain.is_empty()
    {
        out.push(username.to_ascii_lowercase());
    }
    for (_, address, _) in db.aliases(Some(username)).await? {
        if !out.contains(&address) {
            out.push(address);
        }
    }
    Ok(out)
}

/// An alias as stored: `local@domain` or `@domain`, lowercase, at most 255 bytes.
pub fn alias_address(text: &str) -> Result<String, Status> {
    let a = text.trim().to_ascii_lowercase();
    let bad = || {
        Status::invalid_argument(format!(
            "invalid alias {text:?}: use an address (sales@example.org) or @domain (@example.org) for a whole domain"
        ))
    };
    let (local, domain) = a.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let local_ok = local.len() <= 64
        && local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"<>()[]\\,;:\"@".contains(&b));
    if !domain_ok || !local_ok || a.len() > 255 {
        return Err(bad());
    }
    Ok(a)
}

/// The aliases table (migration 0012).
impl Db {
    /// Grants `address` to `username`; false when it was already granted.
    pub async fn add_alias(&self, username: &str, address: &str, at: i64) -> Result<bool, DbError> {
        let mut tx = self.write_tx().await?;
        let exists =
            sqlx::query(self.sql("SELECT 1 FROM user_aliases WHERE username = ? AND address = ?"))
                .bind(username)
                .bind(address)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        if exists {
            return Ok(false);
        }
        sqlx::query(
            self.sql("INSERT INTO user_aliases (username, address, created_at) VALUES (?, ?, ?)"),
        )
        .bind(username)
        .bind(address)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Takes a grant back; false when there was none.
    pub async fn remove_alias(&self, username: &str, address: &str) -> Result<bool, DbError> {
        let r =
            sqlx::query(self.sql("DELETE FROM user_aliases WHERE username = ? AND address = ?"))
                .bind(username)
                .bind(address)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// The account that has `address` (stored form, lowercase) as an alias.
    pub async fn alias_owner(&self, address: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query(
            self.sql("SELECT username FROM user_aliases WHERE address = ? ORDER BY username"),
        )
        .bind(address)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// Forgets every grant of an account (when the account is removed).
    pub async fn remove_aliases_of(&self, username: &str) -> Result<u64, DbError> {
        let r = sqlx::query(self.sql("DELETE FROM user_aliases WHERE username = ?"))
            .bind(username)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// `(username, address, created_at)` of one account, or of all (`None`), in order.
    pub async fn aliases(
        &self,
        username: Option<&str>,
    ) -> Result<Vec<(String, String, i64)>, DbError> {
        let rows = match username {
            Some(u) => {
                sqlx::query(self.sql(
                    "SELECT username, address, created_at FROM user_aliases WHERE username = ? ORDER BY username, address",
                ))
                .bind(u)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT username, address, created_at FROM user_aliases ORDER BY username, address",
                )
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }
}

impl From<Account> for UserInfo {
    fn from(a: Account) -> Self {
        UserInfo {
            username: a.name,
            created_at_unix: a.created_at,
            updated_at_unix: a.updated_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_addresses_or_domains() {
        for (input, want) in [
            ("Sales@Example.ORG", Some("sales@example.org")),
            (" @example.org ", Some("@example.org")),
            (
                "first.last+x@sub.example.org",
                Some("first.last+x@sub.example.org"),
            ),
            ("example.org", None),
            ("a@", None),
            ("a@exa mple.org", None),
            ("a b@example.org", None),
            ("<a>@example.org", None),
            ("a@example..org", None),
            ("a@@example.org", None),
        ] {
            assert_eq!(alias_address(input).ok().as_deref(), want, "{input}");
        }
    }

    #[tokio::test]
    async fn the_owner_of_an_address_is_the_account_with_that_login_or_alias() {
        let dir = std::env::temp_dir().join(format!("mb-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 1).await.expect("open");
        assert!(db.add_user("john-doe@served.test", "x", 1).await.unwrap());
        assert!(db.add_user("john@served.test", "x", 1).await.unwrap());
        assert!(db.add_alias("carol", "j-d@served.test", 2).await.unwrap());
        assert!(db.add_alias("carol", "@brand.test", 2).await.unwrap());
        for (address, want) in [
            ("john-doe@served.test", Some("john-doe@served.test")),
            ("John-Doe@Served.Test", Some("john-doe@served.test")),
            ("j-d@served.test", Some("carol")),
            ("john-news@served.test", None),
            // A whole-domain grant does not make every address of it someone's.
            ("anyone@brand.test", None),
            ("", None),
        ] {
            assert_eq!(
                owner(&db, address).await.unwrap().as_deref(),
                want,
                "{address}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn grants_are_the_login_and_its_aliases() {
        let dir = std::env::temp_dir().join(format!("mb-aliases-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/mb.db", dir.display());
        let db = Db::open(&url, 1).await.expect("open");
        assert!(
            db.add_alias("Bob@Served.test", "ceo@served.test", 1)
                .await
                .unwrap()
        );
        assert!(
            !db.add_alias("Bob@Served.test", "ceo@served.test", 2)
                .await
                .unwrap()
        );
        assert!(
            db.add_alias("Bob@Served.test", "@other.test", 3)
                .await
                .unwrap()
        );
        assert!(db.add_alias("carol", "sales@served.test", 4).await.unwrap());
        assert_eq!(
            granted(&db, "Bob@Served.test").await.unwrap(),
            ["bob@served.test", "@other.test", "ceo@served.test"]
        );
        // A login that is not an address owns only what was granted to it.
        assert_eq!(granted(&db, "carol").await.unwrap(), ["sales@served.test"]);
        assert_eq!(db.aliases(None).await.unwrap().len(), 3);
        assert!(
            db.remove_alias("Bob@Served.test", "ceo@served.test")
                .await
                .unwrap()
        );
        assert!(
            !db.remove_alias("Bob@Served.test", "ceo@served.test")
                .await
                .unwrap()
        );
        assert_eq!(db.remove_aliases_of("Bob@Served.test").await.unwrap(), 1);
        assert_eq!(
            granted(&db, "Bob@Served.test").await.unwrap(),
            ["bob@served.test"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
