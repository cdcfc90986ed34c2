//! The bench's null milter, for the milter floor row: it negotiates exactly as mb-milter
//! does (`mb_milter::session::negotiate`, with no block policy, so the same steps,
//! no-reply flags and macro lists) and answers every message "continue" at its end,
//! without a scan and without header edits. Postfix with it in `smtpd_milters` shows
//! what Postfix's own milter machinery costs per message whatever the milter does (a
//! connection and a negotiation per SMTP session, the events, cleanup re-reading the
//! queue file to send the header and body): the best ratio any milter can reach here.
//!
//! It runs on a thread of the bench process, so its own (small) CPU is not in the
//! figures of the Postfix family that the row reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use mb_milter::proto;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A null milter listening on a loopback port until dropped.
pub struct NullMilter {
    pub port: u16,
    /// Messages it answered at their end.
    pub messages: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NullMilter {
    pub fn start() -> Result<NullMilter> {
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let messages = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for the null milter")?;
        let counted = messages.clone();
        let thread = std::thread::Builder::new()
            .name("null-milter".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = stopped => {}
                        () = accept(listener, counted) => {}
                    }
                });
            })?;
        Ok(NullMilter {
            port,
            messages,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for NullMilter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(listener: TcpListener, messages: Arc<AtomicU64>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(session(stream, messages.clone()));
    }
}

/// One connection: replies only where the negotiated steps ask for one.
async fn session(stream: TcpStream, messages: Arc<AtomicU64>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut protocol = 0u32;
    loop {
        let Ok((cmd, data)) = proto::read(&mut read).await else {
            return;
        };
        let no_reply = match cmd {
            proto::OPTNEG => {
                let Ok((negotiated, reply)) = mb_milter::session::negotiate(&data, false, false)
                else {
                    return;
                };
                protocol = negotiated;
                if proto::write(&mut write, proto::OPTNEG, &reply)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            proto::BODYEOB => {
                messages.fetch_add(1, Ordering::Relaxed);
                0
            }
            proto::CONNECT => proto::NR_CONN,
            proto::HELO => proto::NR_HELO,
            proto::MAIL => proto::NR_MAIL,
            proto::RCPT => proto::NR_RCPT,
            proto::HEADER => proto::NOHREPL,
            proto::EOH => proto::NR_EOH,
            proto::BODY => proto::NR_BODY,
            proto::DATA | proto::UNKNOWN => 0,
            proto::QUIT => return,
            // Macros, abort, a new connection on the same socket: no reply.
            _ => continue,
        };
        if no_reply != 0 && protocol & no_reply != 0 {
            continue;
        }
        if proto::write(&mut write, proto::CONTINUE, &[])
            .await
            .is_err()
            || write.flush().await.is_err()
        {
            return;
        }
    }
}
