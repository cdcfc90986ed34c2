//! The start-up skeleton every daemon runs, so that none repeats it: flags, the async
//! runtime, the configuration (exit 64 before anything is bound), signals, binding while
//! still privileged, dropping privileges, the control socket, reload, READY, the drain
//! with its deadline, removing the socket and the exit status.
//!
//! A daemon says only what differs, as a [`Daemon`]: where its configuration comes from
//! (`configure`; the skeleton then waits up to `process.config_wait` for it to be
//! confirmed, [`Source::confirm`]), what it binds while it may still be root (`bind`), and what it serves
//! once it runs (`start`). The order is fixed here: listeners → privileges dropped →
//! control socket, so that the socket appearing means the daemon is ready. As in
//! mini-redis (`server::run(listener, shutdown)`), [`run`] takes what was bound and the
//! shutdown signal as parameters, so a test can pass both.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use mb_core::Config;
use mb_proto::v1::control_server::ControlServer;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;

use crate::control::{ControlService, DaemonHooks, DaemonInfo, Running};
use crate::follow::Follower;
use crate::lifecycle::{self, Shutdown};
use crate::uds::Guard;
use crate::{EX_CANTCREAT, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE};

/// The flags every daemon takes; `#[command(flatten)]` them into the daemon's `Args`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// Configuration file [env: MAILBORDER_CONFIG; default: /etc/mailborder/mailborder.toml]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log line format (overrides log.format)
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

/// Who a daemon process is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The program: the `daemon` of its log lines, the prefix of configuration errors and
    /// whose overrides it follows (`mb-filter`).
    pub program: &'static str,
    /// This process: the prefix of its failures, its name in `Control.Status` and in its
    /// last log line (`mb-filter@2`).
    pub name: String,
    /// Its control socket, `paths.run_dir/SOCKET.sock` (`mb-filter-2`).
    pub socket: String,
}

impl Identity {
    /// A daemon that runs once per node: every name is the program's.
    pub fn single(program: &'static str) -> Identity {
        Identity {
            program,
            name: program.to_string(),
            socket: program.to_string(),
        }
    }
}

/// A boxed error whose message is shown as it is.
pub type Cause = Box<dyn Error + Send + Sync>;

/// Why a daemon did not start. Each variant is an exit status (sysexits); the message is
/// logged and printed on stderr, one line per line, after the process's name.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work: a certificate, a resolver, a key file (64).
    #[error("{0}")]
    Config(Cause),
    /// Cross-key rules the configuration breaks, one per line (64).
    #[error("{}", .0.iter().map(|p| format!("configuration: {p}")).collect::<Vec<_>>().join("\n"))]
    Check(Vec<String>),
    /// A service the daemon needs (its database) cannot be reached (69).
    #[error("{0}")]
    Unavailable(Cause),
    /// A TCP port cannot be listened on (73). `what` says which setting asked for it.
    #[error("cannot listen on {addr}{}: {cause}", what.map(|w| format!(" ({w})")).unwrap_or_default())]
    Listen {
        addr: SocketAddr,
        what: Option<&'static str>,
        cause: std::io::Error,
    },
    /// The control socket cannot be created (73).
    #[error(transparent)]
    Socket(#[from] crate::uds::SocketError),
    /// Anything else that cannot be created: the spool, a directory (73).
    #[error("{0}")]
    CantCreate(Cause),
    /// Privileges cannot be dropped (70).
    #[error(transparent)]
    Privileges(#[from] crate::PrivilegeError),
    /// What should not happen (70).
    #[error("{0}")]
    Software(Cause),
}

impl StartError {
    /// The exit status of the process.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) | StartError::Check(_) => EX_USAGE,
            StartError::Unavailable(_) => EX_UNAVAILABLE,
            StartError::Listen { .. } | StartError::Socket(_) | StartError::CantCreate(_) => {
                EX_CANTCREAT
            }
            StartError::Privileges(_) | StartError::Software(_) => EX_SOFTWARE,
        }
    }

    pub fn config(cause: impl Into<Cause>) -> StartError {
        StartError::Config(cause.into())
    }

    pub fn unavailable(cause: impl Into<Cause>) -> StartError {
        StartError::Unavailable(cause.into())
    }

    pub fn cant_create(cause: impl Into<Cause>) -> StartError {
        StartError::CantCreate(cause.into())
    }

    pub fn software(cause: impl Into<Cause>) -> StartError {
        StartError::Software(cause.into())
    }
}

/// Where a daemon's running configuration comes from: mb-rpcd's feed for most
/// ([`Follower`]), the database for mb-rpcd itself.
pub trait Source: Send + Sync + 'static {
    /// The effective configuration now.
    fn current(&self) -> Arc<Config>;

    /// Waits, at most `wait`, until the configuration is the one stored now rather than
    /// a cached copy; the skeleton calls it before `bind`, so restart-only keys set while
    /// the daemon was down are in force at this start. A source that reads the truth
    /// directly (mb-rpcd's database) has nothing to wait for.
    fn confirm(&self, _program: &str, _wait: Duration) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// The generation of the stored overrides in `current` (`Control.RunningConfig`).
    fn generation(&self) -> u64 {
        0
    }

    /// Whether `current` is the stored configuration, not a cached copy.
    fn confirmed(&self) -> bool {
        true
    }
}

impl Source for Follower {
    fn current(&self) -> Arc<Config> {
        Follower::current(self)
    }

    fn generation(&self) -> u64 {
        Follower::generation(self)
    }

    fn confirmed(&self) -> bool {
        *self.connected().borrow()
    }

    async fn confirm(&self, program: &str, wait: Duration) {
        Follower::confirm(self, program, wait).await;
    }
}

impl<T: Source> Source for Arc<T> {
    fn current(&self) -> Arc<Config> {
        T::current(self)
    }

    fn confirm(&self, program: &str, wait: Duration) -> impl Future<Output = ()> + Send {
        T::confirm(self, program, wait)
    }

    fn generation(&self) -> u64 {
        T::generation(self)
    }

    fn confirmed(&self) -> bool {
        T::confirmed(self)
    }
}

/// What a daemon hands the skeleton once it runs.
pub struct Serving<H> {
    /// `Control.Status` and `Control.Reload`; SIGHUP reloads through them too.
    pub hooks: Arc<H>,
    /// The daemon's own services on its control socket, next to `Control`.
    pub services: Routes,
    /// Everything else the daemon does (listeners, sessions, background tasks). It ends
    /// once shutdown was requested and the work in flight is done, and is dropped at the
    /// drain deadline.
    pub work: Work,
    /// Tasks that serve until the end (a queue runner, a sync loop): aborted once the
    /// work is drained.
    pub background: tokio::task::JoinSet<()>,
    /// Whether the control socket also answers HTTP/1.1 (mb-web serves its web routes
    /// there, for an nginx in front, next to gRPC's HTTP/2).
    pub http1: bool,
}

/// A daemon's work; an error ends the process with exit 70.
pub type Work = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

impl<H> Serving<H> {
    /// Serves `Control` only on the socket, while `work` runs.
    pub fn new(
        hooks: Arc<H>,
        work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> Self {
        Serving {
            hooks,
            services: Routes::default(),
            work: Box::pin(work),
            background: tokio::task::JoinSet::new(),
            http1: false,
        }
    }

    /// Answers HTTP/1.1 on the control socket too (the routes in `services`).
    pub fn with_http1(mut self) -> Self {
        self.http1 = true;
        self
    }

    /// Serves `services` on the control socket as well.
    pub fn with_services(mut self, services: Routes) -> Self {
        self.services = services;
        self
    }

    /// Runs `background` until the work is drained.
    pub fn with_background(mut self, background: tokio::task::JoinSet<()>) -> Self {
        self.background = background;
        self
    }
}

/// What a running daemon is given.
pub struct Context<S> {
    pub identity: Identity,
    /// `--config`: the file re-read on reload.
    pub config: Option<PathBuf>,
    /// Where the configuration comes from, kept current.
    pub source: S,
    /// The configuration it was started with.
    pub cfg: Arc<Config>,
    pub shutdown: Shutdown,
    /// What `Control.Status` reports; the control socket is its first listener.
    pub info: Arc<DaemonInfo>,
    /// The control socket.
    pub socket: PathBuf,
}

/// One daemon, as the skeleton runs it.
pub trait Daemon: Sized {
    /// Where the configuration comes from.
    type Source: Source;
    /// What is bound before privileges are dropped.
    type Listeners;
    /// `Control.Status` and reload.
    type Hooks: DaemonHooks;

    /// How long the work in flight may take to finish after SIGTERM.
    const DRAIN_DEADLINE: Duration;
    /// What the log says (after `lifecycle::drain`'s warning) when the deadline cut
    /// work short.
    const CUT_SHORT: Option<&'static str> = None;

    fn identity(&self) -> Identity;

    /// Runs once logging is up, before anything else. By default it chooses rustls'
    /// provider (aws-lc-rs), which every daemon's TLS and gRPC use.
    fn init(&self) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }

    /// The daemon's configuration source, from the file: usually
    /// `Follower::start(program, file, shutdown)`. `config` is `--config`.
    fn configure(
        &self,
        file: Config,
        config: Option<&Path>,
        shutdown: &Shutdown,
    ) -> impl Future<Output = Result<Self::Source, StartError>>;

    /// When the daemon was only asked to check its configuration (`mb-rpcd --check`),
    /// the line to print; the process then exits 0 without binding anything.
    fn checked(&self, _source: &Self::Source) -> Option<String> {
        None
    }

    /// Everything that can fail before the daemon serves: ports, the spool, files the
    /// configuration names, resolvers. Runs with the privileges the daemon started with.
    fn bind(&self, cfg: &Config) -> impl Future<Output = Result<Self::Listeners, StartError>>;

    /// The directories the daemon writes besides `paths.run_dir`: created when missing
    /// and, when started as root, handed to `process.user` before switching to it.
    /// `None` keeps the daemon running as it was started.
    fn writable(&self, cfg: &Config) -> Option<Vec<PathBuf>>;

    /// The group the control socket is given to instead of `mailborder` (mb-web's,
    /// for the nginx in front: `web.socket_group`); `None` for the daemons' group.
    fn socket_group(&self, _cfg: &Config) -> Option<String> {
        None
    }

    /// Sets the daemon's work going on `listeners`, once privileges are dropped and the
    /// control socket is bound; logs the daemon's "started" line.
    fn start(
        self,
        listeners: Self::Listeners,
        ctx: &Context<Self::Source>,
    ) -> impl Future<Output = Result<Serving<Self::Hooks>, StartError>>;
}

/// A daemon's `main`: builds the multi-threaded runtime, runs the daemon through
/// [`serve`] and turns its status into the process's exit code.
pub fn main<D: Daemon>(daemon: D, flags: Flags) -> ExitCode {
    let program = daemon.identity().program;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let code = runtime.block_on(serve(daemon, flags));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The whole life of a daemon; returns the exit status. Configuration first (exit 64
/// before anything is bound), then signals, `bind`, the switch to `process.user`, the
/// control socket, and [`run`].
pub async fn serve<D: Daemon>(daemon: D, flags: Flags) -> i32 {
    let identity = daemon.identity();
    let file = match crate::start_daemon(
        identity.program,
        flags.config.as_deref(),
        flags.log_format.as_deref(),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for notice in &file.notices {
        tracing::warn!("{notice}");
    }
    daemon.init();
    let fail = |e: StartError| report(&identity.name, &e);
    let (shutdown, reloads) = match lifecycle::install_signal_handlers() {
        Ok(s) => s,
        Err(e) => {
            return crate::fail(
                &identity.name,
                EX_SOFTWARE,
                &format!("cannot install signal handlers: {e}"),
            );
        }
    };
    // File-only: it must be known before mb-rpcd can be asked.
    let wait = file.duration("process.config_wait");
    let source = match daemon
        .configure(file, flags.config.as_deref(), &shutdown)
        .await
    {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    tokio::select! {
        () = source.confirm(identity.program, wait) => {}
        () = shutdown.requested() => {
            tracing::info!("{} stopped before it started", identity.name);
            return 0;
        }
    }
    let cfg = source.current();
    let problems = cfg.check();
    if !problems.is_empty() {
        return fail(StartError::Check(problems));
    }
    if let Some(line) = daemon.checked(&source) {
        println!("{line}");
        return 0;
    }
    let listeners = match daemon.bind(&cfg).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    // Everything privileged is bound: switch to the unprivileged user when started as
    // root. The control socket is bound after the switch, in a run directory it owns.
    if let Some(extra) = daemon.writable(&cfg) {
        let writable: Vec<PathBuf> = std::iter::once(cfg.path("paths.run_dir"))
            .chain(extra)
            // The log file is reopened on SIGHUP, after the switch.
            .chain(cfg.bool("log.files").then(|| cfg.path("paths.log_dir")))
            .collect();
        for dir in &writable {
            let _ = std::fs::create_dir_all(dir);
        }
        let writable: Vec<&Path> = writable.iter().map(PathBuf::as_path).collect();
        match crate::drop_privileges(&cfg.text("process.user"), &writable) {
            Ok(Some(user)) => tracing::info!(user = %user, "switched to an unprivileged user"),
            Ok(None) => {}
            Err(e) => return fail(e.into()),
        }
    }
    let socket = cfg.socket(&identity.socket);
    let control = match crate::uds::bind_with_group(&socket, daemon.socket_group(&cfg).as_deref()) {
        Ok(l) => l,
        Err(e) => return fail(e.into()),
    };
    let info = DaemonInfo::new(identity.name.clone());
    info.add_listener(format!("unix:{}", socket.display()));
    let ctx = Context {
        identity,
        config: flags.config,
        source,
        cfg,
        shutdown,
        info,
        socket,
    };
    run(daemon, listeners, control, ctx, reloads).await
}

/// Runs a bound daemon until `ctx.shutdown`, then drains it with its deadline; returns
/// the exit status. SIGHUP requests arrive on `reloads`. The control socket `control`
/// serves `Control` and the daemon's services, and is removed at the end.
pub async fn run<D: Daemon>(
    daemon: D,
    listeners: D::Listeners,
    control: UnixListener,
    ctx: Context<D::Source>,
    reloads: mpsc::Receiver<()>,
) -> i32 {
    let name = ctx.identity.name.clone();
    let serving = match daemon.start(listeners, &ctx).await {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&ctx.socket);
            return report(&name, &e);
        }
    };
    let reloader = spawn_reloader(name.clone(), reloads, serving.hooks.clone());
    let shutdown = ctx.shutdown.clone();
    let source = Arc::new(ctx.source);
    let running = Running {
        program: ctx.identity.program,
        started: ctx.cfg.clone(),
        now: Box::new(move || (source.current(), source.generation(), source.confirmed())),
    };
    let control = tonic::transport::Server::builder()
        .accept_http1(serving.http1)
        .add_routes(serving.services)
        .add_service(ControlServer::with_interceptor(
            ControlService::new(ctx.info.clone(), serving.hooks).with_running(running),
            Guard::peer(),
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(control), async move {
            shutdown.requested().await
        });
    lifecycle::notify_ready();
    let Serving {
        work, background, ..
    } = serving;
    let drained = lifecycle::drain(&ctx.shutdown, D::DRAIN_DEADLINE, async move {
        tokio::join!(control, work)
    })
    .await;
    // Also when the work ended by itself, without a signal.
    lifecycle::notify_stopping();
    reloader.abort();
    drop(background);
    let _ = std::fs::remove_file(&ctx.socket);
    match drained {
        None => {
            if let Some(what) = D::CUT_SHORT {
                tracing::warn!("{what}");
            }
        }
        Some((Err(e), _)) => {
            return crate::fail(&name, EX_SOFTWARE, &format!("control socket: {e}"));
        }
        Some((Ok(()), Err(e))) => return crate::fail(&name, EX_SOFTWARE, &format!("{e:#}")),
        Some((Ok(()), Ok(()))) => {}
    }
    tracing::info!("{name} stopped");
    0
}

/// Logs and prints a start-up failure, one line per line; gives the exit status.
fn report(name: &str, e: &StartError) -> i32 {
    let code = e.exit_code();
    for line in e.to_string().lines() {
        crate::fail(name, code, line);
    }
    code
}

/// Serves SIGHUP through the daemon's `Control.Reload`, between sd_notify RELOADING and
/// READY; a failure is logged and the running configuration stays.
fn spawn_reloader<H: DaemonHooks>(
    name: String,
    mut requests: mpsc::Receiver<()>,
    hooks: Arc<H>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while requests.recv().await.is_some() {
            lifecycle::notify_reloading();
            match crate::logging::reopen() {
                Some(Ok(path)) => tracing::info!(file = %path.display(), "reopened the log file"),
                Some(Err(e)) => {
                    tracing::warn!(cause = %e, "cannot reopen the log file; logging to stderr only")
                }
                None => {}
            }
            match hooks.reload().await {
                Ok(r) if !r.restart_required.is_empty() => {
                    tracing::warn!(keys = %r.restart_required.join(","), "restart {name} to apply these keys");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(cause = %e.message(), "reload failed, keeping the running configuration");
                }
            }
            lifecycle::notify_reloaded();
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use mb_proto::v1::control_client::ControlClient;
    use mb_proto::v1::{ReloadResponse, VersionRequest};

    use super::*;

    /// A configuration that never changes.
    struct Fixed(Arc<Config>);

    impl Source for Fixed {
        fn current(&self) -> Arc<Config> {
            self.0.clone()
        }
    }

    #[derive(Default)]
    struct Reloads(AtomicU32);

    #[tonic::async_trait]
    impl DaemonHooks for Reloads {
        async fn reload(&self) -> Result<ReloadResponse, tonic::Status> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(ReloadResponse::default())
        }
    }

    /// What the test daemon's work does after shutdown was requested.
    #[derive(Clone, Copy)]
    enum Then {
        /// Refuse to start.
        Refuse,
        Finish,
        Fail,
        Hang,
    }

    struct Toy {
        then: Then,
        hooks: Arc<Reloads>,
    }

    impl Daemon for Toy {
        type Source = Fixed;
        type Listeners = ();
        type Hooks = Reloads;

        const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

        fn identity(&self) -> Identity {
            Identity::single("mb-toy")
        }

        async fn configure(
            &self,
            file: Config,
            _config: Option<&Path>,
            _shutdown: &Shutdown,
        ) -> Result<Fixed, StartError> {
            Ok(Fixed(Arc::new(file)))
        }

        async fn bind(&self, _cfg: &Config) -> Result<(), StartError> {
            Ok(())
        }

        fn writable(&self, _cfg: &Config) -> Option<Vec<PathBuf>> {
            None
        }

        async fn start(self, (): (), ctx: &Context<Fixed>) -> Result<Serving<Reloads>, StartError> {
            let shutdown = ctx.shutdown.clone();
            let then = self.then;
            if let Then::Refuse = then {
                return Err(StartError::config("cannot read /nonexistent/key.pem"));
            }
            Ok(Serving::new(self.hooks, async move {
                shutdown.requested().await;
                match then {
                    Then::Refuse | Then::Finish => Ok(()),
                    Then::Fail => Err(anyhow::anyhow!("lost the spool")),
                    Then::Hang => std::future::pending().await,
                }
            }))
        }
    }

    /// Runs `Toy` on a socket in a temp dir: the socket, the trigger, the SIGHUP sender,
    /// the reload counter and the running daemon's exit status.
    fn start(
        then: Then,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        lifecycle::ShutdownTrigger,
        mpsc::Sender<()>,
        Arc<Reloads>,
        tokio::task::JoinHandle<i32>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mb-toy.sock");
        let control = crate::uds::bind(&socket).unwrap();
        let (trigger, shutdown) = lifecycle::shutdown_pair();
        let (hup, reloads) = mpsc::channel(1);
        let hooks = Arc::new(Reloads::default());
        let ctx = Context {
            identity: Identity::single("mb-toy"),
            config: None,
            source: Fixed(Arc::new(Config::default())),
            cfg: Arc::new(Config::default()),
            shutdown,
            info: DaemonInfo::new("mb-toy"),
            socket: socket.clone(),
        };
        let toy = Toy {
            then,
            hooks: hooks.clone(),
        };
        let running = tokio::spawn(run(toy, (), control, ctx, reloads));
        (dir, socket, trigger, hup, hooks, running)
    }

    #[tokio::test]
    async fn serves_control_and_sighup_until_shutdown_then_removes_its_socket() {
        let (_dir, socket, trigger, hup, hooks, running) = start(Then::Finish);
        let channel = crate::uds::connect(&socket, "mb-toy").await.unwrap();
        let version = ControlClient::new(channel)
            .version(VersionRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(version.daemon, "mb-toy");
        hup.send(()).await.unwrap();
        while hooks.0.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!running.is_finished());
        trigger.trigger();
        assert_eq!(running.await.unwrap(), 0);
        assert!(!socket.exists(), "socket left behind");
    }

    #[tokio::test]
    async fn a_refused_start_is_its_exit_status_and_leaves_no_socket() {
        let (_dir, socket, _trigger, _hup, _hooks, running) = start(Then::Refuse);
        assert_eq!(running.await.unwrap(), EX_USAGE);
        assert!(!socket.exists(), "socket left behind");
    }

    #[tokio::test]
    async fn failed_work_is_exit_70() {
        let (_dir, socket, trigger, _hup, _hooks, running) = start(Then::Fail);
        trigger.trigger();
        assert_eq!(running.await.unwrap(), EX_SOFTWARE);
        assert!(!socket.exists(), "socket left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn work_past_the_drain_deadline_is_dropped() {
        let (_dir, socket, trigger, _hup, _hooks, running) = start(Then::Hang);
        tokio::task::yield_now().await;
        let asked = tokio::time::Instant::now();
        trigger.trigger();
        let status = tokio::time::timeout(Toy::DRAIN_DEADLINE * 2, running)
            .await
            .expect("the drain deadline was not kept");
        assert_eq!(status.unwrap(), 0);
        assert!(
            asked.elapsed() >= Toy::DRAIN_DEADLINE,
            "{:?}",
            asked.elapsed()
        );
        assert!(!socket.exists(), "socket left behind");
    }

    #[test]
    fn each_start_error_is_its_exit_status() {
        let io = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let check = |e: StartError, code: i32, text: &str| {
            assert_eq!(e.exit_code(), code, "{e}");
            assert_eq!(e.to_string(), text);
        };
        check(StartError::config("bad certificate"), 64, "bad certificate");
        check(
            StartError::Check(vec!["a".into(), "b".into()]),
            64,
            "configuration: a\nconfiguration: b",
        );
        check(StartError::unavailable("no database"), 69, "no database");
        check(
            StartError::Listen {
                addr,
                what: Some("smtp"),
                cause: io(),
            },
            73,
            &format!("cannot listen on 127.0.0.1:25 (smtp): {}", io()),
        );
        check(
            StartError::Listen {
                addr,
                what: None,
                cause: io(),
            },
            73,
            &format!("cannot listen on 127.0.0.1:25: {}", io()),
        );
        check(StartError::cant_create("no spool"), 73, "no spool");
        check(StartError::software("oops"), 70, "oops");
    }
}
