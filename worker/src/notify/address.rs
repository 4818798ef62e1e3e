//! Where the sender may connect: public addresses only, unless the operator allows private ones
//! (`NOTIFY_ALLOW_PRIVATE_ADDRESSES`, for an app in the same network or local development). An
//! endpoint's name is checked after it is resolved, on every connection, so a name that later
//! resolves to an internal address (DNS rebinding) is refused too: the sender is not a way in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Whether `ip` is an address on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_unspecified()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier-grade NAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19))) // benchmarking
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64: an IPv4 address of any kind behind it
}

/// The sender's resolver: the system's, with every answer that is not public dropped (unless
/// allowed). A name that resolves only to such addresses fails to connect, with a clear error.
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> =
                found.iter().copied().filter(|addr| allow_private || is_public(addr.ip())).collect();
            if kept.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = if found.is_empty() {
                    format!("{host} resolves to no address").into()
                } else {
                    format!("{host} resolves only to private or reserved addresses (NOTIFY_ALLOW_PRIVATE_ADDRESSES is off)").into()
                };
                return Err(error);
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

impl GuardedResolver {
    pub fn shared(allow_private: bool) -> Arc<Self> {
        Arc::new(Self { allow_private })
    }
}

/// An endpoint whose URL names an address directly (no resolver runs for it): checked once, at start.
pub fn literal_allowed(url: &url::Url, allow_private: bool) -> bool {
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return true,
    };
    allow_private || is_public(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_not_public() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::",
        ] {
            assert!(!is_public(internal.parse().unwrap()), "{internal}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn a_literal_internal_url_needs_the_allowance() {
        let metadata = url::Url::parse("https://169.254.169.254/latest").unwrap();
        assert!(!literal_allowed(&metadata, false));
        assert!(literal_allowed(&metadata, true));
        assert!(literal_allowed(&url::Url::parse("https://app.example/h").unwrap(), false));
    }

    #[tokio::test]
    async fn the_resolver_drops_what_is_not_public() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let refused = GuardedResolver { allow_private: false }.resolve(name).await;
        assert!(refused.err().unwrap().to_string().contains("private or reserved"));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let allowed = GuardedResolver { allow_private: true }.resolve(name).await.unwrap();
        assert!(allowed.into_iter().all(|addr| addr.ip().is_loopback()));
    }
}
