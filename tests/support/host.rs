//! This host, as the API server sees it.
//!
//! ```ignore
//! #[path = "support/host.rs"]
//! mod host;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use std::net::{IpAddr, Ipv4Addr};

/// An address of this host the API server proxies to (it refuses loopback and link-local
/// addresses): `CLAW_TEST_AGENT_IP`, else the first IPv4 address of this host that is up and
/// neither loopback nor link-local.
pub fn proxyable_ip() -> IpAddr {
    if let Some(ip) = std::env::var("CLAW_TEST_AGENT_IP")
        .ok()
        .filter(|s| !s.is_empty())
    {
        return ip
            .parse()
            .unwrap_or_else(|e| panic!("CLAW_TEST_AGENT_IP={ip:?} is not an IP address: {e}"));
    }
    let mut found = None;
    // SAFETY: getifaddrs hands out a list we only read, and free exactly once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        assert_eq!(
            libc::getifaddrs(&mut list),
            0,
            "getifaddrs: {}",
            std::io::Error::last_os_error()
        );
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && ifa.ifa_flags & (libc::IFF_UP as u32) != 0
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                    found = Some(ip);
                    break;
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    IpAddr::V4(found.expect(
        "this host has no IPv4 address other than loopback and link-local, and the API server \
         refuses to proxy to those: give the host one, or set CLAW_TEST_AGENT_IP to an address \
         of this host that the API server can reach",
    ))
}
