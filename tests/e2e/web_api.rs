//! mb-web's API areas that mirror the administration tools (configuration, policies,
//! bans and trusts), driven over HTTPS with real logins against a real mb-rpcd, and
//! compared with what `mb-config`, `mb-policy` and `mb-ban` show: the same state, the
//! same audit trail (naming `web:NAME`), the same words when something is refused, and
//! each role held to what it may do.

use hyper::Method;
use mb_testkit::text;
use serde_json::{Value as Json, json};

use crate::web_auth::{Reply, Web};

const PASSWORD: &str = "correct horse battery";

/// A session's cookie and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

impl Session {
    async fn login(web: &Web, name: &str) -> Session {
        let r = web.login(name, PASSWORD, "").await;
        assert_eq!(r.status, 200, "login {name}: {r:?}");
        Session {
            cookie: r.session_cookie(),
            csrf: r.body["csrf_token"].as_str().unwrap().to_string(),
        }
    }

    async fn call(&self, web: &Web, method: Method, path: &str, body: Option<Json>) -> Reply {
        web.https(
            method,
            path,
            &[("cookie", &self.cookie), ("x-csrf-token", &self.csrf)],
            body,
        )
        .await
    }
}

/// `TOOL ARGS` against the test gateway: (exit code, stdout, stderr).
fn tool(web: &Web, name: &str, args: &[&str]) -> (i32, String, String) {
    text(&web.gw.tool(name, args))
}

/// A refusal: the status, a problem document, and the detail.
fn refused(r: &Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{r:?}"
    );
    r.body["detail"].as_str().unwrap_or_default().to_string()
}

/// Three roles: an admin, a domain admin of a.test and a user there.
fn accounts(web: &Web) {
    web.add("boss", &["--role", "admin"]);
    web.add("dora", &["--role", "domain-admin", "--domains", "a.test"]);
    web.add("jane", &["--role", "user", "--addresses", "jane@a.test"]);
}

#[tokio::test]
async fn configuration_through_the_api_is_what_mb_config_shows() {
    let web = Web::start("totp_required = \"\"\n");
    accounts(&web);
    let boss = Session::login(&web, "boss").await;
    let key = "spam.threshold.tag";
    let path = format!("/api/v1/config/{key}");

    // Set through the API: mb-config reads it back, and its audit trail names the web
    // principal, not mb-web's own user.
    let r = boss
        .call(&web, Method::PUT, &path, Some(json!({"value": "7.5"})))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["key"], key);
    let (code, out, err) = tool(&web, "mb-config", &["get", key]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), r.body["value"].as_str().unwrap());
    assert!(out.trim().starts_with("7.5"), "{out}");
    let (code, out, err) = tool(&web, "mb-config", &["history", key]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("web:boss set spam.threshold.tag"), "{out}");

    // Read back: the value with the registry's metadata, in the list and alone.
    let one = boss.call(&web, Method::GET, &path, None).await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.body["source"], "database");
    assert!(!one.body["description"].as_str().unwrap().is_empty());
    assert_eq!(one.body["apply"], "live");
    let list = boss
        .call(
            &web,
            Method::GET,
            "/api/v1/config?prefix=spam.threshold",
            None,
        )
        .await;
    assert_eq!(list.status, 200, "{list:?}");
    let values = list.body["values"].as_array().unwrap();
    assert!(
        values
            .iter()
            .all(|v| v["key"].as_str().unwrap().starts_with("spam.threshold."))
    );
    assert!(
        values
            .iter()
            .any(|v| v["key"] == key && v["value"] == one.body["value"])
    );
    let history = boss
        .call(
            &web,
            Method::GET,
            &format!("/api/v1/config/history?key={key}"),
            None,
        )
        .await;
    assert_eq!(history.status, 200, "{history:?}");
    assert_eq!(history.body[0]["user"], "web:boss", "{history:?}");
    assert_eq!(history.body[0]["action"], "set");

    // A refused value: the same words as mb-config, and nothing stored.
    let (code, _, cli_err) = tool(&web, "mb-config", &["set", "network.smtp.port", "70000"]);
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(
            &web,
            Method::PUT,
            "/api/v1/config/network.smtp.port",
            Some(json!({"value": "70000"})),
        )
        .await;
    let detail = refused(&r, 400);
    assert!(
        !detail.is_empty() && cli_err.contains(&detail),
        "{detail:?} vs {cli_err:?}"
    );
    // Validation says the same without storing, and accepts a good value.
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/config/network.smtp.port/validate",
            Some(json!({"value": "70000"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["valid"], false);
    assert_eq!(r.body["error"].as_str().unwrap(), detail);
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/config/network.smtp.port/validate",
            Some(json!({"value": "2525"})),
        )
        .await;
    assert_eq!(
        (r.body["valid"].clone(), r.body["canonical"].clone()),
        (json!(true), json!("2525"))
    );
    let (_, out, _) = tool(&web, "mb-config", &["get", "network.smtp.port"]);
    assert_ne!(out.trim(), "2525", "validate must not store");
    // An unknown key: 404 with mb-config's words.
    let (code, _, cli_err) = tool(&web, "mb-config", &["get", "network.smtp.prot"]);
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(&web, Method::GET, "/api/v1/config/network.smtp.prot", None)
        .await;
    let detail = refused(&r, 404);
    assert!(
        !detail.is_empty() && cli_err.contains(&detail),
        "{detail:?} vs {cli_err:?}"
    );

    // CSRF: the session's cookie alone does not change anything.
    let r = web
        .https(
            Method::PUT,
            &path,
            &[("cookie", &boss.cookie)],
            Some(json!({"value": "1"})),
        )
        .await;
    assert!(refused(&r, 403).contains("CSRF"), "{r:?}");
    let (_, out, _) = tool(&web, "mb-config", &["get", key]);
    assert!(
        out.trim().starts_with("7.5"),
        "a request without CSRF token changed {key}: {out}"
    );

    // Neither a domain admin nor a user reads or changes the configuration.
    for who in ["dora", "jane"] {
        let s = Session::login(&web, who).await;
        let r = s.call(&web, Method::GET, "/api/v1/config", None).await;
        assert!(
            refused(&r, 403).contains("is not an administrator"),
            "{r:?}"
        );
        let r = s
            .call(&web, Method::PUT, &path, Some(json!({"value": "1"})))
            .await;
        refused(&r, 403);
    }
    let (_, out, _) = tool(&web, "mb-config", &["get", key]);
    assert!(out.trim().starts_with("7.5"), "{out}");

    // Unset: the default again, and the trail names the web principal once more.
    let r = boss.call(&web, Method::DELETE, &path, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.body["removed"].clone(), r.body["source"].clone()),
        (json!(true), json!("default"))
    );
    let (_, out, _) = tool(&web, "mb-config", &["history", key]);
    assert!(out.contains("web:boss unset spam.threshold.tag"), "{out}");
}

#[tokio::test]
async fn policies_bans_and_trusts_through_the_api_match_the_tools() {
    let web = Web::start("totp_required = \"\"\n");
    accounts(&web);
    let boss = Session::login(&web, "boss").await;
    let dora = Session::login(&web, "dora").await;
    let jane = Session::login(&web, "jane").await;

    // Policies: added through the API, listed by mb-policy.
    let partners =
        json!({"name": "partners", "action": "allow", "pattern": "*@a.test", "priority": 10});
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/policies",
            Some(partners.clone()),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        (r.body["object"].clone(), r.body["direction"].clone()),
        (json!("address"), json!("from"))
    );
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "b-strict", "action": "score", "pattern": "b.test", "direction": "to", "tag": 2.0})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let (code, out, err) = tool(&web, "mb-policy", &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("partners") && out.contains("from *@a.test"),
        "{out}"
    );
    // A taken name: 409 with mb-policy's words.
    let (code, _, cli_err) = tool(
        &web,
        "mb-policy",
        &["add", "partners", "--action", "allow", "--from", "*@a.test"],
    );
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(&web, Method::POST, "/api/v1/policies", Some(partners))
        .await;
    let detail = refused(&r, 409);
    assert!(cli_err.contains(&detail), "{detail:?} vs {cli_err:?}");
    // A bad action: 400, nothing added.
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "odd", "action": "maybe", "pattern": "c.test"})),
        )
        .await;
    refused(&r, 400);
    // Test: the explanation mb-policy test prints.
    let (code, out, err) = tool(
        &web,
        "mb-policy",
        &["test", "--json", "--from", "x@a.test", "--to", "bob@b.test"],
    );
    assert_eq!(code, 0, "{err}");
    let cli: Json = serde_json::from_str(&out).unwrap();
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/policies/test",
            Some(json!({"from": "x@a.test", "to": ["bob@b.test"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["explanation"], cli["explanation"]);
    assert_eq!(r.body["matched"], cli["matched"]);
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/policies/test",
            Some(json!({"from": "x@a.test", "ip": "not-an-ip"})),
        )
        .await;
    assert_eq!(refused(&r, 400), "--ip \"not-an-ip\" is not an IP address");
    // A domain admin reads its domain's policy only, and changes none; a user reads none.
    let r = dora.call(&web, Method::GET, "/api/v1/policies", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["partners"]);
    let r = dora
        .call(&web, Method::GET, "/api/v1/policies/b-strict", None)
        .await;
    refused(&r, 404);
    let r = dora
        .call(&web, Method::DELETE, "/api/v1/policies/partners", None)
        .await;
    refused(&r, 403);
    let r = jane.call(&web, Method::GET, "/api/v1/policies", None).await;
    refused(&r, 403);
    // Replace, then delete: mb-policy sees each.
    let r = boss
        .call(
            &web,
            Method::PUT,
            "/api/v1/policies/partners",
            Some(json!({"name": "partners", "action": "allow", "pattern": "*@a.test", "priority": 20})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["priority"].clone()),
        (200, json!(20)),
        "{r:?}"
    );
    let (_, out, _) = tool(&web, "mb-policy", &["list", "--json"]);
    let listed: Json = serde_json::from_str(&out).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "partners" && p["priority"] == 20),
        "{out}"
    );
    // A refused replacement leaves the old policy in place.
    let r = boss
        .call(
            &web,
            Method::PUT,
            "/api/v1/policies/partners",
            Some(json!({"name": "partners", "action": "maybe", "pattern": "*@a.test"})),
        )
        .await;
    refused(&r, 400);
    let (_, out, _) = tool(&web, "mb-policy", &["list"]);
    assert!(
        out.contains("partners"),
        "the refused replacement lost the policy: {out}"
    );
    let r = boss
        .call(&web, Method::DELETE, "/api/v1/policies/partners", None)
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let (_, out, _) = tool(&web, "mb-policy", &["list"]);
    assert!(!out.contains("partners"), "{out}");
    let (_, _, cli_err) = tool(&web, "mb-policy", &["del", "partners"]);
    let r = boss
        .call(&web, Method::DELETE, "/api/v1/policies/partners", None)
        .await;
    let detail = refused(&r, 404);
    assert!(cli_err.contains(&detail), "{detail:?} vs {cli_err:?}");

    // Bans and trusts: added through the API, listed by mb-ban with the web actor.
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/bans",
            Some(json!({"ip": "192.0.2.7", "for": "2h", "reason": "probing"})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/trusts",
            Some(json!({"ip": "198.51.100.0/24"})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let (code, out, err) = tool(&web, "mb-ban", &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let cli: Json = serde_json::from_str(&out).unwrap();
    let ban = cli
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == "192.0.2.7")
        .unwrap_or_else(|| panic!("no ban in {out}"));
    assert_eq!(
        (ban["kind"].clone(), ban["added_by"].clone()),
        (json!("ban"), json!("web:boss"))
    );
    assert!(ban["seconds_left"].as_u64().unwrap() > 3600, "{ban}");
    let listed = boss.call(&web, Method::GET, "/api/v1/bans", None).await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(listed.body.as_array().unwrap().len(), 1, "{listed:?}");
    assert_eq!(listed.body[0]["reason"], "probing");
    let trusts = boss.call(&web, Method::GET, "/api/v1/trusts", None).await;
    assert_eq!(trusts.body[0]["kind"], "trust", "{trusts:?}");
    // Refusals in mb-ban's words: a bad duration, a bad address.
    let (code, _, cli_err) = tool(&web, "mb-ban", &["add", "192.0.2.8", "--for", "forever"]);
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/bans",
            Some(json!({"ip": "192.0.2.8", "for": "forever"})),
        )
        .await;
    let detail = refused(&r, 400);
    assert!(cli_err.contains(&detail), "{detail:?} vs {cli_err:?}");
    let (code, _, cli_err) = tool(&web, "mb-ban", &["add", "not-an-ip"]);
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(
            &web,
            Method::POST,
            "/api/v1/bans",
            Some(json!({"ip": "not-an-ip"})),
        )
        .await;
    let detail = refused(&r, 400);
    assert!(cli_err.contains(&detail), "{detail:?} vs {cli_err:?}");
    // Only an administrator sees or changes them.
    for s in [&dora, &jane] {
        refused(&s.call(&web, Method::GET, "/api/v1/bans", None).await, 403);
        refused(
            &s.call(&web, Method::DELETE, "/api/v1/bans/192.0.2.7", None)
                .await,
            403,
        );
    }
    // Lifted through the API (a network's slash escaped); gone for mb-ban too.
    let r = boss
        .call(&web, Method::DELETE, "/api/v1/bans/192.0.2.7", None)
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = boss
        .call(
            &web,
            Method::DELETE,
            "/api/v1/trusts/198.51.100.0%2F24",
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let (_, out, _) = tool(&web, "mb-ban", &["list"]);
    assert!(
        !out.contains("192.0.2.7") && !out.contains("198.51.100.0"),
        "{out}"
    );
    let (_, _, cli_err) = tool(&web, "mb-ban", &["del", "192.0.2.7"]);
    let r = boss
        .call(&web, Method::DELETE, "/api/v1/bans/192.0.2.7", None)
        .await;
    let detail = refused(&r, 404);
    assert!(cli_err.contains(&detail), "{detail:?} vs {cli_err:?}");
}

#[tokio::test]
async fn smtp_accounts_through_the_api_match_mb_user() {
    let web = Web::start("totp_required = \"\"\n");
    accounts(&web);
    let boss = Session::login(&web, "boss").await;
    let dora = Session::login(&web, "dora").await;
    let jane = Session::login(&web, "jane").await;
    let base = "/api/v1/smtp-accounts";
    for name in ["bob@a.test", "carl@b.test"] {
        let r = boss
            .call(
                &web,
                Method::POST,
                base,
                Some(json!({"name": name, "password": PASSWORD})),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let (code, out, err) = tool(&web, "mb-user", &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("bob@a.test") && out.contains("carl@b.test"),
        "{out}"
    );
    // Refusals: a taken name, a weak password, a missing account (in mb-user's words).
    let r = boss
        .call(
            &web,
            Method::POST,
            base,
            Some(json!({"name": "bob@a.test", "password": PASSWORD})),
        )
        .await;
    refused(&r, 409);
    let r = boss
        .call(
            &web,
            Method::POST,
            base,
            Some(json!({"name": "weak@a.test", "password": "short"})),
        )
        .await;
    refused(&r, 400);
    let (code, _, cli_err) = tool(&web, "mb-user", &["del", "nobody@a.test"]);
    assert_eq!(code, 1, "{cli_err}");
    let r = boss
        .call(&web, Method::DELETE, &format!("{base}/nobody@a.test"), None)
        .await;
    let detail = refused(&r, 404);
    assert!(cli_err.contains(&detail), "{detail:?} vs {cli_err:?}");

    // A domain admin: its domain's accounts and aliases only.
    let r = dora.call(&web, Method::GET, base, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob@a.test"]);
    let r = dora
        .call(
            &web,
            Method::POST,
            &format!("{base}/bob@a.test/aliases"),
            Some(json!({"address": "sales@a.test"})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["changed"].clone()),
        (200, json!(true)),
        "{r:?}"
    );
    let (_, out, _) = tool(&web, "mb-user", &["alias", "list", "bob@a.test"]);
    assert!(out.contains("sales@a.test"), "{out}");
    let r = dora
        .call(
            &web,
            Method::POST,
            &format!("{base}/bob@a.test/aliases"),
            Some(json!({"address": "ceo@b.test"})),
        )
        .await;
    refused(&r, 403);
    let r = dora
        .call(&web, Method::DELETE, &format!("{base}/carl@b.test"), None)
        .await;
    refused(&r, 403);
    let r = dora
        .call(
            &web,
            Method::PUT,
            &format!("{base}/carl@b.test/password"),
            Some(json!({"password": PASSWORD})),
        )
        .await;
    refused(&r, 403);
    let r = dora
        .call(
            &web,
            Method::POST,
            base,
            Some(json!({"name": "eve@b.test", "password": PASSWORD})),
        )
        .await;
    refused(&r, 403);
    refused(&jane.call(&web, Method::GET, base, None).await, 403);
    let (_, out, _) = tool(&web, "mb-user", &["list"]);
    assert!(
        out.contains("carl@b.test") && !out.contains("eve@b.test"),
        "{out}"
    );

    // Its own domain's account: password, alias removal, removal.
    let r = dora
        .call(
            &web,
            Method::PUT,
            &format!("{base}/bob@a.test/password"),
            Some(json!({"password": "another good password"})),
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = dora
        .call(
            &web,
            Method::DELETE,
            &format!("{base}/bob@a.test/aliases/sales@a.test"),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let (_, out, _) = tool(&web, "mb-user", &["alias", "list", "bob@a.test"]);
    assert!(!out.contains("sales@a.test"), "{out}");
    let r = dora
        .call(&web, Method::DELETE, &format!("{base}/bob@a.test"), None)
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let (_, out, _) = tool(&web, "mb-user", &["list"]);
    assert!(!out.contains("bob@a.test"), "{out}");
}
