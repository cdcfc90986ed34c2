//! Loopback ports for the daemons and peers a test starts.

use std::net::TcpListener;

/// A loopback TCP port nobody listens on right now, and that nothing else in this
/// process was handed. Ports come from below the kernel's ephemeral range (32768 and up
/// on Linux), so an outgoing connection's source port cannot take a port between the
/// moment a test picks it and the moment its daemon binds it; each test process starts
/// at its own offset so that parallel test binaries rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let _ = NEXT.compare_exchange(
            u32::MAX,
            (std::process::id() * 397) % SPAN,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        // TCP and UDP: the DNS server a test starts listens on both.
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN)
}
