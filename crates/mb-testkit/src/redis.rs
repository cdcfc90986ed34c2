//! A private Redis server, the shared-state peer.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

use crate::ports::free_port;
use crate::procs::{Proc, require, wait_until};

/// A private Redis server on a loopback port, without persistence.
pub struct Redis {
    pub port: u16,
    pub server: Proc,
}

impl Redis {
    pub fn start() -> Result<Redis> {
        let program = require("redis-server", "redis-server");
        let port = free_port();
        let child = Command::new(program)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Proc {
            child,
            name: "redis-server".into(),
        };
        wait_until("redis to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::Write;
                let mut buf = [0u8; 7];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
            })
        })?;
        Ok(Redis { port, server })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}
