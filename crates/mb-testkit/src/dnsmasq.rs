//! A dnsmasq DNS server serving a test zone (MX and address records).

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

use crate::ports::free_port;
use crate::procs::{Proc, is_root, require, wait_until};

/// dnsmasq serving a test zone on a loopback port. `records` are dnsmasq options such
/// as `--mx-host=example.test,mx1.example.test,10` and `--host-record=mx1.example.test,127.0.0.1`.
pub struct Dnsmasq {
    pub port: u16,
    pub server: Proc,
}

impl Dnsmasq {
    pub fn start(records: &[String]) -> Result<Dnsmasq> {
        let program = require("dnsmasq", "dnsmasq-base");
        let port = free_port();
        let mut cmd = Command::new(program);
        cmd.args([
            "--no-daemon",
            "--port",
            &port.to_string(),
            "--listen-address",
            "127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--log-facility=-",
            "--pid-file",
        ]);
        if is_root() {
            cmd.arg("--user=root");
        }
        cmd.args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = Proc {
            child: cmd.spawn()?,
            name: "dnsmasq".into(),
        };
        // dnsmasq answers TCP too: listening means it is ready.
        wait_until("dnsmasq to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(Dnsmasq { port, server })
    }

    /// The `network.dns.servers` value for this server.
    pub fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
