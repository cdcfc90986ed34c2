//! A TCP relay that can cut and heal a link, to test behaviour across network failures.

use std::io::Read;
use std::net::TcpListener;

use anyhow::Result;

use crate::ports::free_port;

/// A TCP relay on a loopback port in front of another loopback address, that can cut the
/// link the way a failed network does: while cut, nothing is forwarded in either
/// direction and no packet says so (connections stay open, new ones are accepted and
/// go nowhere). Connections from before a cut stay dead after `heal`, as TCP sessions
/// across a real outage do; new ones work again.
pub struct LinkProxy {
    pub port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LinkProxy {
    pub fn start(upstream: std::net::SocketAddr) -> Result<LinkProxy> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let generation = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let (g, c) = (generation.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let born = g.load(Ordering::SeqCst);
                let server = if c.load(Ordering::SeqCst) {
                    None
                } else {
                    std::net::TcpStream::connect(upstream).ok()
                };
                let alive = {
                    let (g, c) = (g.clone(), c.clone());
                    move || !c.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) == born
                };
                match server {
                    Some(server) => {
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            let alive = alive.clone();
                            std::thread::spawn(move || {
                                use std::io::Write;
                                let mut buf = [0u8; 16384];
                                loop {
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => {
                                            if alive() {
                                                let _ = to.shutdown(std::net::Shutdown::Write);
                                            }
                                            return;
                                        }
                                        Ok(n) => {
                                            if alive() && to.write_all(&buf[..n]).is_err() {
                                                return;
                                            }
                                        }
                                    }
                                }
                            });
                        }
                    }
                    None => {
                        // Swallow what the client sends, answer nothing.
                        std::thread::spawn(move || {
                            let mut client = client;
                            let mut buf = [0u8; 16384];
                            while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                }
            }
        });
        Ok(LinkProxy {
            port,
            generation,
            cut,
        })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Cuts the link.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Restores the link for new connections.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
