//! Who may call a route. Authentication (`crate::auth`: sessions, API keys) and the
//! local administrator rule below put a [`Principal`] into the request's extensions;
//! routes take [`Signed`] (anyone authenticated) or [`Admin`] as an argument, so a route
//! without one of them is public by its signature.

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::auth::{Principal, Role};
use crate::peer::Peer;
use crate::problem::Problem;

/// Any authenticated caller.
#[derive(Debug, Clone)]
pub struct Signed(pub Principal);

/// An authenticated administrator.
#[derive(Debug, Clone)]
pub struct Admin(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Signed {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Signed)
            .ok_or_else(|| {
                Problem::unauthorized(
                    "authentication required: log in, or send an API key as \"Authorization: Bearer KEY\"",
                )
            })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Signed(p) = Signed::from_request_parts(parts, state).await?;
        if p.role == Role::Admin {
            Ok(Admin(p))
        } else {
            Err(Problem::forbidden(format!(
                "{} is not an administrator",
                p.name
            )))
        }
    }
}

/// Root and mb-web's own user on the socket act as an administrator without logging in
/// (they could read mb-web's files anyway); nginx's user, in the `mailborder` group to
/// reach the socket, does not.
pub async fn local_admin(mut req: Request, next: Next) -> Response {
    if req.extensions().get::<Principal>().is_none()
        && let Some(peer @ Peer::Local { uid, .. }) = req.extensions().get::<Peer>()
        && peer.is_local_admin()
    {
        let name = format!("local:{}", mb_runtime::uds::user_name(*uid));
        req.extensions_mut().insert(Principal {
            name,
            role: Role::Admin,
            domains: Vec::new(),
            addresses: Vec::new(),
        });
    }
    next.run(req).await
}
