//! DNS: the resolver enrolled processes are redirected to (`server`), a client for the
//! configured upstreams (`client`), and the limits on names chosen under a wildcard
//! (`exfil`). The wire format is hickory-proto's; nothing here parses
//! DNS by hand.
//!
//! The daemon never uses the system resolver (`getaddrinfo`): every lookup goes to
//! `dns.upstream` (which defaults to the nameservers of `/etc/resolv.conf`) or is answered
//! from `dns.static`, so a test or an air-gapped host controls exactly what is asked where.

pub mod client;
pub mod exfil;
pub mod server;
