//! Who is given the values of secret keys (`database.url`, `ldap.bind_password`, ...):
//! local callers on the Unix socket, except mb-web's user, which is given only the
//! secrets the registry says mb-web reads (`rspamd.controller_password`). TCP callers
//! never see them. mb-web holds no database credentials (issue 16): a compromised
//! mb-web must not be able to ask mb-rpcd for them.

use mb_core::KeyDef;
use mb_core::registry::WEB;
use mb_runtime::uds::Caller;

/// The system user mb-web runs as (systemd/mb-web.service, packaging/debian/postinst).
pub const WEB_USER: &str = "mb-web";

/// mb-web's uid, looked up at each question so a user created after mb-rpcd started
/// counts too (only asked for secret keys and non-root local callers: rare and cheap).
fn web_uid() -> Option<u32> {
    nix::unistd::User::from_name(WEB_USER)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// Whether `caller` is mb-web's user on the Unix socket (root never is).
pub fn is_web(caller: &Caller) -> bool {
    caller
        .uid
        .is_some_and(|uid| uid != 0 && web_uid() == Some(uid))
}

/// Whether `caller` is given the value of `def` (always, unless the key is secret).
pub fn reveals(def: &KeyDef, caller: &Caller) -> bool {
    reveals_to(def, caller, web_uid)
}

fn reveals_to(def: &KeyDef, caller: &Caller, web_uid: impl FnOnce() -> Option<u32>) -> bool {
    if !def.secret {
        return true;
    }
    match caller.uid {
        None => false,
        Some(0) => true,
        // Derived from the registry, not a list kept here: a secret mb-web reads is one
        // whose readers include it.
        Some(uid) => def.daemons.contains(&WEB) || web_uid() != Some(uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mb_core::registry;

    fn caller(uid: Option<u32>) -> Caller {
        Caller {
            uid,
            name: "test".into(),
        }
    }

    fn key(name: &str) -> &'static KeyDef {
        registry::find(name).expect("a registry key")
    }

    const WEB_UID: u32 = 4242;

    #[test]
    fn mb_web_is_not_given_secrets_it_does_not_read() {
        let web = caller(Some(WEB_UID));
        for name in [
            "database.url",
            "ldap.bind_password",
            "network.rpcd.tcp.api_key",
        ] {
            assert!(!reveals_to(key(name), &web, || Some(WEB_UID)), "{name}");
        }
        // What mb-web reads it is given, and non-secret keys are never masked.
        assert!(reveals_to(
            key("rspamd.controller_password"),
            &web,
            || Some(WEB_UID)
        ));
        assert!(reveals_to(key("network.https.port"), &web, || Some(
            WEB_UID
        )));
    }

    #[test]
    fn other_local_callers_see_secrets_and_tcp_callers_do_not() {
        let db = key("database.url");
        assert!(reveals_to(db, &caller(Some(0)), || Some(0)));
        assert!(reveals_to(db, &caller(Some(1000)), || Some(WEB_UID)));
        // No mb-web user on this host: nobody is mistaken for it.
        assert!(reveals_to(db, &caller(Some(WEB_UID)), || None));
        assert!(!reveals_to(db, &caller(None), || Some(WEB_UID)));
        assert!(!reveals_to(
            key("rspamd.controller_password"),
            &caller(None),
            || None
        ));
    }

    #[test]
    fn every_secret_mb_web_is_given_is_one_it_reads() {
        let web = caller(Some(WEB_UID));
        let given: Vec<&str> = registry::KEYS
            .iter()
            .filter(|d| d.secret && reveals_to(d, &web, || Some(WEB_UID)))
            .map(|d| d.key)
            .collect();
        assert!(given.contains(&"rspamd.controller_password"), "{given:?}");
        for k in &given {
            assert!(
                key(k).daemons.contains(&WEB),
                "{k} is given to mb-web but not read by it"
            );
        }
    }
}
