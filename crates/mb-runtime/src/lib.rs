//! What every daemon and tool shares: the daemons' start-up skeleton (`daemon`), log
//! lines, configuration loading, signals and drain, sd_notify, and gRPC over Unix
//! sockets with peer-credential checks.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod diskfree;
pub mod docs;
pub mod events;
pub mod follow;
#[cfg(feature = "ldap")]
pub mod ldap;
pub mod lifecycle;
pub mod logging;
pub mod policies;
pub mod probe;
pub mod quarantine;
pub mod rebuild;
pub mod uds;

use std::path::{Path, PathBuf};

use mb_core::Config;

/// Exit status for a bad configuration or command line (sysexits EX_USAGE).
pub const EX_USAGE: i32 = 64;
/// Exit status when a needed service (database, daemon) cannot be reached (EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: i32 = 69;
/// Exit status for an internal error (EX_SOFTWARE).
pub const EX_SOFTWARE: i32 = 70;
/// Exit status when a socket or listener cannot be created (EX_CANTCREAT).
pub const EX_CANTCREAT: i32 = 73;

/// Where the configuration file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/mailborder/mailborder.toml";
/// The variable that names the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "MAILBORDER_CONFIG";

/// The configuration file to read: `--config`, else `$MAILBORDER_CONFIG`, else the
/// default path. The flag says whether the user named it (then it must exist).
pub fn config_path(arg: Option<&Path>) -> (PathBuf, bool) {
    if let Some(p) = arg {
        return (p.to_path_buf(), true);
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

/// Why the configuration file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable or has errors: every problem, in file order.
    /// Shown one line per problem, each naming file and line.
    #[error("{}", lines(.0))]
    File(Vec<mb_core::FileError>),
}

fn lines(errors: &[mb_core::FileError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads the configuration file (defaults only when the default file is absent).
/// The error is ready to print: one line per problem, each naming file and line.
pub fn load_config(arg: Option<&Path>) -> Result<Config, ConfigError> {
    let (path, named) = config_path(arg);
    if !named && !path.exists() {
        return Ok(Config::default());
    }
    Config::load_file(&path).map_err(ConfigError::File)
}

/// Why a daemon could not hand its files to its user or switch to it. The messages
/// name the system's error, so it is not repeated as a `source`.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot look up user {user}: {cause}")]
    LookUp { user: String, cause: nix::Error },
    #[error("cannot hand {} to {user}: {cause}", .path.display())]
    Hand {
        path: PathBuf,
        user: String,
        cause: std::io::Error,
    },
    /// `setgroups`, `setgid` or `setuid` failed.
    #[error("{call}: {cause}")]
    Switch {
        call: &'static str,
        cause: nix::Error,
    },
    /// `setuid(0)` succeeded after the switch: the process is not really unprivileged.
    #[error("could regain root after dropping privileges")]
    RegainedRoot,
}

/// Files a daemon creates are for its user and group only (sockets get 0660 explicitly).
pub fn set_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
}

/// For tools: the configuration even when the file has errors, so the sockets can still
/// be found; the problems are printed as a warning first.
pub fn load_config_for_tool(tool: &str, arg: Option<&Path>) -> Config {
    let (path, named) = config_path(arg);
    if !named && !path.exists() {
        return Config::default();
    }
    let (cfg, errors) = Config::load_file_lenient(&path);
    if !errors.is_empty() {
        eprintln!(
            "{tool}: warning: {} has errors (see `mb-config validate`); using what parses:",
            path.display()
        );
        for e in errors {
            eprintln!("{tool}: warning: {e}");
        }
    }
    cfg
}

/// When running as root, hands `writable` (recursively) to `user` and switches to it:
/// how a daemon started by hand binds port 25 and still runs unprivileged. Under systemd
/// the unit starts it as that user with `CAP_NET_BIND_SERVICE`, and nothing happens here.
/// Returns the user switched to, if any.
pub fn drop_privileges(user: &str, writable: &[&Path]) -> Result<Option<String>, PrivilegeError> {
    use nix::unistd::{Uid, User, setgid, setgroups, setuid};
    if user.is_empty() || !Uid::effective().is_root() {
        return Ok(None);
    }
    let Some(u) = User::from_name(user).map_err(|cause| PrivilegeError::LookUp {
        user: user.to_string(),
        cause,
    })?
    else {
        tracing::warn!(
            user,
            "running as root: user {user} does not exist (create it, or set process.user = \"\")"
        );
        return Ok(None);
    };
    for path in writable {
        chown_tree(path, u.uid, u.gid).map_err(|cause| PrivilegeError::Hand {
            path: path.to_path_buf(),
            user: user.to_string(),
            cause,
        })?;
    }
    let switch = |call| move |cause| PrivilegeError::Switch { call, cause };
    setgroups(&[u.gid]).map_err(switch("setgroups"))?;
    setgid(u.gid).map_err(switch("setgid"))?;
    setuid(u.uid).map_err(switch("setuid"))?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::RegainedRoot);
    }
    Ok(Some(user.to_string()))
}

/// When running as root, hands `path` (recursively) to `user`, so that a daemon running
/// as that user can use what a tool run by root wrote there. Nothing happens otherwise,
/// or when the user does not exist.
pub fn hand_to(user: &str, path: &Path) -> Result<(), PrivilegeError> {
    use nix::unistd::{Uid, User};
    if user.is_empty() || !Uid::effective().is_root() {
        return Ok(());
    }
    match User::from_name(user) {
        Ok(Some(u)) => chown_tree(path, u.uid, u.gid).map_err(|cause| PrivilegeError::Hand {
            path: path.to_path_buf(),
            user: user.to_string(),
            cause,
        }),
        _ => Ok(()),
    }
}

fn chown_tree(path: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    nix::unistd::chown(path, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The first steps of every daemon: umask, configuration file (printing every problem and
/// returning EX_USAGE before anything is bound), then logging as the file asks.
pub fn start_daemon(
    daemon: &'static str,
    config: Option<&Path>,
    log_format: Option<&str>,
) -> Result<Config, i32> {
    set_umask();
    let cfg = load_config(config).map_err(|e| {
        for line in e.to_string().lines() {
            logging::print_error(daemon, line);
        }
        EX_USAGE
    })?;
    let json = log_format.unwrap_or(&cfg.text("log.format")) == "json";
    let file = cfg
        .bool("log.files")
        .then(|| cfg.path("paths.log_dir").join(format!("{daemon}.log")));
    logging::init_with_file(daemon, &cfg.text("log.level"), json, file);
    Ok(cfg)
}

/// Reports a start-up failure on the log and on stderr, and gives the exit status.
pub fn fail(daemon: &str, code: i32, msg: &str) -> i32 {
    tracing::error!("{msg}");
    logging::print_error(daemon, msg);
    code
}

/// Re-reads the configuration file into `follower` (SIGHUP, `Control.Reload`); on
/// error the running configuration is kept.
pub fn reread(follower: &follow::Follower, config: Option<&Path>) -> Result<(), ConfigError> {
    follower.reload_file(load_config(config)?);
    Ok(())
}

/// The resolver settings `network.dns.*` describe: the servers (`None` for the system's
/// /etc/resolv.conf) and the options (cache, TTL cap, timeouts). Every daemon that
/// resolves (mb-smtpd's delivery, mb-filter's checks) builds its resolver from these.
pub fn resolver_settings(
    cfg: &Config,
) -> (
    Option<hickory_resolver::config::ResolverConfig>,
    hickory_resolver::config::ResolverOpts,
) {
    use hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
    };
    use mb_core::value::{DnsServers, Value};
    let mut opts = ResolverOpts::default();
    opts.cache_size = if cfg.bool("network.dns.cache.enabled") {
        4096
    } else {
        0
    };
    let ttl = cfg.duration("network.dns.cache.ttl");
    opts.positive_max_ttl = Some(ttl);
    opts.negative_max_ttl = Some(ttl.min(std::time::Duration::from_secs(300)));
    opts.timeout = std::time::Duration::from_secs(5);
    opts.attempts = 2;
    // Validation against the IANA root trust anchor hickory carries; a daemon whose
    // servers strip signatures gets no answer it could trust (see network.dns.dnssec).
    opts.validate = cfg.bool("network.dns.dnssec");
    let servers = match cfg.get("network.dns.servers") {
        Value::DnsServers(DnsServers::List(list)) => Some(ResolverConfig::from_name_servers(
            list.iter()
                .map(|a| {
                    let on_port = |mut c: ConnectionConfig| {
                        c.port = a.port();
                        c
                    };
                    NameServerConfig::new(
                        a.ip(),
                        true,
                        vec![
                            on_port(ConnectionConfig::udp()),
                            on_port(ConnectionConfig::tcp()),
                        ],
                    )
                })
                .collect(),
        )),
        _ => None,
    };
    (servers, opts)
}
