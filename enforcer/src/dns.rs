//! DNS: the resolver enrolled processes are redirected to (`server`), and a client for the
//! configured upstreams (`client`). The wire format is hickory-proto's; nothing here parses
//! DNS by hand.
//!
//! The daemon never uses the system resolver (`getaddrinfo`): every lookup goes to
//! `dns.upstream` (which defaults to the nameservers of `/etc/resolv.conf`) or is answered
//! from `dns.static`, so a test or an air-gapped host controls exactly what is asked where.

pub mod client;
pub mod server;
