//! Signals, draining and sd_notify: how a daemon starts, reloads and stops.
//!
//! SIGTERM and SIGINT start a graceful drain, SIGHUP asks for a reload. systemd is told
//! READY, RELOADING and STOPPING, and the watchdog is fed when the unit asks for it.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};

/// A cloneable handle that resolves once shutdown has been requested.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers a [`Shutdown`]; tests use it in place of a signal.
#[derive(Clone)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// A new shutdown pair, not yet triggered.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// Resolves when shutdown is requested (at once if it already was).
    pub async fn requested(&self) {
        let mut rx = self.rx.clone();
        // An error means every trigger is gone: nobody can ask any more, so stop.
        let _ = rx.wait_for(|v| *v).await;
    }

    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Listens for SIGTERM/SIGINT (shutdown) and SIGHUP (reload requests on the returned
/// channel). Must be called inside a tokio runtime.
pub fn install_signal_handlers() -> std::io::Result<(Shutdown, mpsc::Receiver<()>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let (trigger, shutdown) = shutdown_pair();
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received, draining"); break; }
                _ = int.recv() => { tracing::info!("SIGINT received, draining"); break; }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received, reloading");
                    let _ = reload_tx.try_send(());
                }
            }
        }
        notify_stopping();
        trigger.trigger();
    });
    Ok((shutdown, reload_rx))
}

/// Runs `work` until it finishes after shutdown was requested, or until `deadline` has
/// passed since the request; says so when the deadline cut the drain short.
pub async fn drain<F: Future<Output = T>, T>(
    shutdown: &Shutdown,
    deadline: Duration,
    work: F,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return Some(out),
        () = shutdown.requested() => {}
    }
    match tokio::time::timeout(deadline, work).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!(
                deadline_secs = deadline.as_secs(),
                "drain deadline passed, stopping with work in flight"
            );
            None
        }
    }
}

/// Tells systemd the daemon is ready, and starts feeding the watchdog if the unit has
/// `WatchdogSec=`. Outside systemd this does nothing.
pub fn notify_ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    if let Some(timeout) = sd_notify::watchdog_enabled().filter(|t| !t.is_zero()) {
        let period = timeout / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
}

pub fn notify_reloading() {
    // Type=notify-reload units need the monotonic time of the reload start.
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000
    });
    let _ = sd_notify::notify(&[NotifyState::Reloading, NotifyState::MonotonicUsec(usec)]);
}

/// Ends a reload: systemd expects READY=1 again.
pub fn notify_reloaded() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

pub fn notify_status(text: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(text)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_work_up_to_the_deadline() {
        let (trigger, shutdown) = shutdown_pair();
        trigger.trigger();
        // Work that finishes within the deadline is awaited.
        let out = drain(&shutdown, Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            7
        })
        .await;
        assert_eq!(out, Some(7));
        // Work that does not is abandoned at the deadline.
        let out = drain(
            &shutdown,
            Duration::from_secs(5),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(out, None);
    }

    #[tokio::test]
    async fn work_that_ends_by_itself_needs_no_shutdown() {
        let (_trigger, shutdown) = shutdown_pair();
        assert_eq!(
            drain(&shutdown, Duration::from_secs(1), async { 3 }).await,
            Some(3)
        );
        assert!(!shutdown.is_requested());
    }
}
