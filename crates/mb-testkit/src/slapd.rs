//! A private OpenLDAP server (Debian's `slapd`), the directory peer of the LDAP recipient
//! verification and login tests: its own cn=config and mdb database in a temp dir, loaded
//! with `slapadd`, listening on a loopback port.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ports::free_port;
use crate::procs::{Proc, run_ok, wait_until};

/// How to get slapd without its installer asking questions or setting up a system
/// directory of its own.
const INSTALL_HINT: &str = "install it with `echo 'slapd slapd/no_configuration boolean true' | debconf-set-selections && apt-get install -y slapd ldap-utils` (`cargo xtask test` does this when run as root)";

/// A private slapd on `ldap://127.0.0.1:PORT/` with the directory below: base
/// `dc=example,dc=test`, a service account that may read it ([`Slapd::BIND_DN`]), and
/// these people (password: the uid followed by `-pw`):
///
/// | uid | mail | other addresses | sAMAccountName |
/// |---|---|---|---|
/// | alice | alice@example.test | proxyAddresses `SMTP:alice@example.test`, `smtp:a.liddell@example.test`, `smtp:sales@example.test` | aliddell |
/// | bob | bob@example.test | | |
/// | shared (twice, in two OUs) | shared1@example.test, shared2@example.test | | |
///
/// Anonymous clients can bind and see the base entry but no one below it, so a client
/// that searches without binding (or after a failed bind) finds nobody. A DN with an
/// empty password binds too, as an anonymous "unauthenticated bind" (`olcAllows:
/// bind_anon_dn`, what Active Directory does), so a client that took such a bind for a
/// password check would let anyone in. A search under a
/// base the server does not hold is answered with a referral to [`Slapd::REFERRAL`].
pub struct Slapd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The ldaps:// port, with a self-signed certificate for 127.0.0.1 ([`Slapd::ca_file`]).
    pub tls_port: u16,
    server: Option<Proc>,
}

impl Slapd {
    pub const BASE: &str = "dc=example,dc=test";
    pub const BIND_DN: &str = "cn=mailborder,ou=services,dc=example,dc=test";
    pub const BIND_PASSWORD: &str = "mb-ldap-bind-pw";
    /// The database's root DN, for changing the directory during a test.
    pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=test";
    pub const ADMIN_PASSWORD: &str = "mb-ldap-admin-pw";
    /// Where slapd refers searches under a base it does not hold (`olcReferral`, as a
    /// domain controller refers to another domain of its forest). Nothing listens there.
    pub const REFERRAL: &str = "ldap://127.0.0.1:1/";

    pub fn start() -> Result<Slapd> {
        for program in ["/usr/sbin/slapd", "/usr/sbin/slapadd", "/usr/bin/ldapadd"] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: {INSTALL_HINT}"
            );
        }
        let dir = tempfile::Builder::new().prefix("mb-slapd-").tempdir()?;
        let config = dir.path().join("slapd.d");
        let data = dir.path().join("data");
        fs::create_dir(&config)?;
        fs::create_dir(&data)?;
        fs::write(dir.path().join("config.ldif"), config_ldif(dir.path()))?;
        fs::write(dir.path().join("data.ldif"), DATA_LDIF)?;
        let (cert, key) = crate::tls::self_signed();
        fs::write(dir.path().join("tls.crt"), cert)?;
        fs::write(dir.path().join("tls.key"), key)?;
        run_ok(
            Command::new("/usr/sbin/slapadd")
                .args(["-n0", "-F"])
                .arg(&config)
                .arg("-l")
                .arg(dir.path().join("config.ldif")),
        )
        .context("load slapd's cn=config")?;
        run_ok(
            Command::new("/usr/sbin/slapadd")
                .args(["-n1", "-F"])
                .arg(&config)
                .arg("-l")
                .arg(dir.path().join("data.ldif")),
        )
        .context("load the test directory")?;
        let mut slapd = Slapd {
            dir,
            port: free_port(),
            tls_port: free_port(),
            server: None,
        };
        slapd.start_again()?;
        Ok(slapd)
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}/", self.tls_port)
    }

    /// The PEM certificate the ldaps:// port presents (self-signed: its own CA).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    /// The `[ldap]` table of a gateway configuration that uses this directory.
    pub fn config_toml(&self) -> String {
        format!(
            "[ldap]\nurl = \"{}\"\nbind_dn = \"{}\"\nbind_password = \"{}\"\nbase = \"{}\"\n",
            self.url(),
            Self::BIND_DN,
            Self::BIND_PASSWORD,
            Self::BASE
        )
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("slapd.log")
    }

    /// Stops the server (by its pid) and waits for it to exit; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.signal(nix::sys::signal::Signal::SIGCONT);
            server.stop(Duration::from_secs(10));
        }
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the kernel but
    /// nothing answers, as with a hung directory. [`Slapd::resume`] thaws it.
    pub fn pause(&self) {
        if let Some(server) = &self.server {
            server.signal(nix::sys::signal::Signal::SIGSTOP);
            // The stop is delivered asynchronously: wait until the kernel reports it.
            let stat = format!("/proc/{}/stat", server.pid());
            let stopped = || {
                fs::read_to_string(&stat).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            };
            wait_until("slapd to stop", Duration::from_secs(5), stopped).expect("slapd stopped");
        }
    }

    pub fn resume(&self) {
        if let Some(server) = &self.server {
            server.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Starts the server (again) on the same port and data, and waits until the service
    /// account can bind.
    pub fn start_again(&mut self) -> Result<()> {
        self.stop();
        let log = fs::File::create(self.log_path())?;
        let child = Command::new("/usr/sbin/slapd")
            // -d keeps slapd in the foreground (even at level 0), so the pid is its own.
            .args([
                "-d",
                "0",
                "-h",
                &format!("{} {}", self.url(), self.ldaps_url()),
                "-F",
            ])
            .arg(self.dir.path().join("slapd.d"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn slapd")?;
        let mut server = Proc {
            child,
            name: "slapd".into(),
        };
        let url = self.url();
        let ready = wait_until("slapd to accept a bind", Duration::from_secs(30), || {
            matches!(server.child.try_wait(), Ok(Some(_)))
                || Command::new("/usr/bin/ldapwhoami")
                    .args([
                        "-x",
                        "-H",
                        &url,
                        "-D",
                        Self::BIND_DN,
                        "-w",
                        Self::BIND_PASSWORD,
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        let log = || fs::read_to_string(self.log_path()).unwrap_or_default();
        if let Ok(Some(status)) = server.child.try_wait() {
            anyhow::bail!("slapd exited with {status}:\n{}", log());
        }
        ready.with_context(log)?;
        self.server = Some(server);
        Ok(())
    }

    /// Adds entries (LDIF) as the directory's administrator, with the ManageDsaIT
    /// control so that `referral` entries are stored as entries.
    pub fn add(&self, ldif: &str) -> Result<()> {
        let mut child = Command::new("/usr/bin/ldapadd")
            .args([
                "-M",
                "-x",
                "-H",
                &self.url(),
                "-D",
                Self::ADMIN_DN,
                "-w",
                Self::ADMIN_PASSWORD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ldapadd")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("ldapadd's stdin")?;
            stdin.write_all(ldif.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "ldapadd failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// cn=config: the mdb backend (a module in Debian's build), the standard schemas plus
/// Active Directory's `proxyAddresses` and `sAMAccountName` (defined here with the
/// case-insensitive matching AD applies: the copies in Debian's msuser schema have no
/// equality rule, so a filter on them would never match), the `mailAlternateAddress`
/// of Sun's and Postfix's mail schemas (not in Debian's standard ones), and access rules.
fn config_ldif(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {d}/slapd.pid
olcArgsFile: {d}/slapd.args
olcTLSCertificateFile: {d}/tls.crt
olcTLSCertificateKeyFile: {d}/tls.key
olcReferral: {referral}
olcAllows: bind_anon_dn

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif

include: file:///etc/ldap/schema/cosine.ldif

include: file:///etc/ldap/schema/inetorgperson.ldif

dn: cn=mailborder-ad,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: mailborder-ad
olcAttributeTypes: ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses' EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
olcAttributeTypes: ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 2.16.840.1.113730.3.1.13 NAME 'mailAlternateAddress' EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 )
olcObjectClasses: ( 1.3.6.1.4.1.64869.1.1 NAME 'mbTestMailUser' SUP top AUXILIARY MAY ( proxyAddresses $ sAMAccountName $ mailAlternateAddress ) )

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {d}/data
olcSuffix: {base}
olcRootDN: {admin}
olcRootPW: {admin_pw}
olcDbIndex: objectClass eq
olcDbIndex: mail,uid,proxyAddresses,sAMAccountName eq
olcAccess: {{0}}to attrs=userPassword by anonymous auth by * none
olcAccess: {{1}}to dn.base="{base}" by * read
olcAccess: {{2}}to * by dn.exact="{bind}" read by self read by * none
"#,
        base = Slapd::BASE,
        admin = Slapd::ADMIN_DN,
        admin_pw = Slapd::ADMIN_PASSWORD,
        bind = Slapd::BIND_DN,
        referral = Slapd::REFERRAL,
    )
}

/// The directory's entries (see [`Slapd`]). Passwords in clear text: slapd compares
/// them as given, and nothing here is a real secret.
const DATA_LDIF: &str = r#"dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Example Test

dn: ou=services,dc=example,dc=test
objectClass: organizationalUnit
ou: services

dn: cn=mailborder,ou=services,dc=example,dc=test
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: mailborder
userPassword: mb-ldap-bind-pw

dn: ou=people,dc=example,dc=test
objectClass: organizationalUnit
ou: people

dn: ou=contractors,dc=example,dc=test
objectClass: organizationalUnit
ou: contractors

dn: uid=alice,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: mbTestMailUser
uid: alice
cn: Alice Liddell
sn: Liddell
mail: alice@example.test
proxyAddresses: SMTP:alice@example.test
proxyAddresses: smtp:a.liddell@example.test
proxyAddresses: smtp:sales@example.test
sAMAccountName: aliddell
userPassword: alice-pw

dn: uid=bob,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: bob
cn: Bob Builder
sn: Builder
mail: bob@example.test
userPassword: bob-pw

dn: cn=shared one,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: shared
cn: shared one
sn: One
mail: shared1@example.test
userPassword: shared-pw

dn: cn=shared two,ou=contractors,dc=example,dc=test
objectClass: inetOrgPerson
uid: shared
cn: shared two
sn: Two
mail: shared2@example.test
userPassword: shared-pw
"#;
