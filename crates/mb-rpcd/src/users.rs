//! Accounts for SMTP AUTH: Argon2id hashes in the database, checked here so that no
//! hash ever leaves mb-rpcd.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use mb_proto::v1::users_server::Users;
use mb_proto::v1::{
    AddUserRequest, ListUsersRequest, ListUsersResponse, RemoveUserRequest, RemoveUserResponse,
    SetPasswordRequest, UserInfo, VerifyRequest, VerifyResponse,
};
use mb_runtime::control::DaemonInfo;
use mb_runtime::uds::caller;
use tonic::{Request, Response, Status};

use crate::db::Account;
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

fn check_password(p: &str) -> Result<(), Status> {
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
    hash(password).await
}

/// Hashing is CPU-bound: keep it off the async workers.
async fn hash(password: String) -> Result<String, Status> {
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

/// A hash of a password nobody has, verified when the user does not exist so that a
/// wrong name costs as much time as a wrong password.
static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

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
        let exists = stored.is_some();
        let hash = match stored {
            Some(h) => h,
            None => DUMMY
                .get_or_init(|| {
                    PasswordHasher::<PasswordHash>::hash_password(
                        &Argon2::default(),
                        b"no such user: dummy password",
                    )
                    .map(|h| h.to_string())
                    .unwrap_or_default()
                })
                .clone(),
        };
        let password = r.password;
        let ok = tokio::task::spawn_blocking(move || {
            PasswordVerifier::<str>::verify_password(&Argon2::default(), password.as_bytes(), &hash)
                .is_ok()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let ok = ok && exists;
        self.info
            .counters
            .add(if ok { "auth_ok" } else { "auth_failed" }, 1);
        Ok(Response::new(VerifyResponse { ok }))
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
