//! The resolver enrolled processes talk to (the kernel redirects their port-53 traffic here).
//!
//! For each query:
//! 1. identify the agent from the kernel's record of the client socket; an unknown client is
//!    refused (REFUSED), so the port is no open resolver;
//! 2. a name the agent's policy cannot allow gets NXDOMAIN, nothing is sent upstream, and a
//!    `dns` audit record is written (`would_deny` and a real answer in dry-run);
//! 3. HTTPS and SVCB queries get an empty answer: ECH would defeat SNI checks and address
//!    hints would escape learning;
//! 4. a name allowed only through a wildcard, whose labels the agent chose, is answered only
//!    for A, AAAA and CNAME (others get REFUSED), only if its labels look like a name (else
//!    NXDOMAIN, unless the rule says `dns_labels: any`), and only within the agent's budget of
//!    distinct names a minute under that wildcard (else NXDOMAIN): see `exfil`. Nothing of a
//!    refused name is sent upstream;
//! 5. an allowed name is answered from `dns.static`, or forwarded to `dns.upstream`, with CNAME
//!    chains followed;
//! 6. for a name allowed only through a wildcard, internal answers (loopback, private,
//!    link-local, metadata) are stripped unless `dns.allow_internal_answers` covers them;
//! 7. the addresses are learned into the agent's kernel allowlist, with the name, for the TTL
//!    (floor 5 s, cap `dns.max_ttl`), *before* the answer is sent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata, rdata::opt::EdnsOption},
};
use ipnet::IpNet;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::{
    agents::{Caller, Registry},
    audit::{Decisions, EventKind, PolicyResult},
    bpf::{BpfError, Kernel},
    dns::{client, exfil},
    policy::{HostMatch, Mode, canonical_host},
};

/// Shortest time a learned address stays allowed.
pub const MIN_TTL: u32 = 5;
/// TTL given to `dns.static` answers (capped by `dns.max_ttl`).
pub const STATIC_TTL: u32 = 60;
/// Longest CNAME chain followed.
const MAX_CHAIN: usize = 8;
/// Longest time a TCP client may take to send a query.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What the resolver needs from the kernel: the records of who sent a query (by the
/// client's address, UDP or TCP) and the allowlist that learned addresses go into. A trait,
/// so queries can be answered in tests without root.
pub trait DnsKernel: Send + Sync + 'static {
    fn dns_client(&self, peer: SocketAddr) -> Option<enforcer_common::DnsClient>;
    fn take_orig(&self, peer: SocketAddr) -> Option<enforcer_common::OrigDst>;
    fn learn_allow(
        &self,
        agent: u32,
        ip: IpAddr,
        expires_boot_ns: u64,
        exact: bool,
        quota: usize,
    ) -> Result<(), BpfError>;
}

impl DnsKernel for Kernel {
    fn dns_client(&self, peer: SocketAddr) -> Option<enforcer_common::DnsClient> {
        Kernel::dns_client(self, peer)
    }

    fn take_orig(&self, peer: SocketAddr) -> Option<enforcer_common::OrigDst> {
        Kernel::take_orig(self, peer)
    }

    fn learn_allow(
        &self,
        agent: u32,
        ip: IpAddr,
        expires_boot_ns: u64,
        exact: bool,
        quota: usize,
    ) -> Result<(), BpfError> {
        Kernel::learn_allow(self, agent, ip, expires_boot_ns, exact, quota)
    }
}

/// What the resolver needs.
pub struct Resolver {
    pub kernel: Arc<dyn DnsKernel>,
    pub registry: Arc<Registry>,
    pub decisions: Decisions,
    /// `dns.static`, keyed by canonical name.
    pub statics: BTreeMap<String, Vec<IpAddr>>,
    pub upstreams: Vec<SocketAddr>,
    pub max_ttl: u32,
    /// `dns.max_learned_per_agent`.
    pub max_learned: usize,
    pub allow_internal: Vec<IpNet>,
    /// `dns.wildcard_names_per_minute`.
    pub names: exfil::NameBudget,
    /// A name carrying a credential's placeholder is a leak.
    pub credentials: Option<Arc<crate::credentials::Vault>>,
    /// `agent_api`: `enforcer.internal` is answered for every agent.
    pub agent_api: bool,
}

impl Resolver {
    /// `upstreams` are the servers `config` names (or the system's), resolved by the caller.
    pub fn new(
        kernel: Arc<dyn DnsKernel>,
        registry: Arc<Registry>,
        decisions: Decisions,
        config: &crate::config::DnsConfig,
        upstreams: Vec<SocketAddr>,
    ) -> Self {
        let statics = config
            .static_hosts
            .iter()
            .filter_map(|(k, v)| Some((canonical_host(k).ok()?, v.clone())))
            .collect();
        Self {
            kernel,
            registry,
            decisions,
            statics,
            upstreams,
            max_ttl: config.max_ttl.max(MIN_TTL),
            max_learned: config.max_learned_per_agent,
            allow_internal: config.allow_internal_answers.clone(),
            names: exfil::NameBudget::new(config.wildcard_names_per_minute),
            credentials: None,
            agent_api: false,
        }
    }

    /// Answers `enforcer.internal` (the agent API) for every agent.
    pub fn with_agent_api(mut self, on: bool) -> Self {
        self.agent_api = on;
        self
    }

    /// Refuses names that carry a credential's placeholder.
    pub fn with_credentials(mut self, vault: Arc<crate::credentials::Vault>) -> Self {
        self.credentials = Some(vault);
        self
    }

    /// Answers one query message. `None` when nothing sensible can be sent back.
    async fn answer(&self, client: Option<&Caller>, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => {
                // A header we can read gets FORMERR; garbage gets nothing.
                let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        let reply = |code: ResponseCode, answers: Vec<Record>| {
            let mut m = Message::response(request.metadata.id, request.metadata.op_code);
            m.metadata.recursion_desired = request.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.metadata.response_code = code;
            m.add_queries(request.queries.iter().cloned());
            m.add_answers(answers);
            m
        };
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
            || request.queries.len() != 1
        {
            return encode(reply(ResponseCode::FormErr, Vec::new()), &request, udp);
        }
        let Some(client) = client else {
            // Not an enrolled process (or its record is gone): no open resolver here.
            return encode(reply(ResponseCode::Refused, Vec::new()), &request, udp);
        };
        client.agent.touch_eval();
        let query = &request.queries[0];
        let qname = query.name().to_ascii();
        let qtype = query.query_type();
        // A denial keeps NXDOMAIN (nothing exists for this agent) and says why in an Extended
        // DNS Error, so a client that reads it can tell a policy from an outage.
        let denied = || {
            blocked(
                reply(ResponseCode::NXDomain, Vec::new()),
                &request,
                &client.agent.name,
            )
        };
        let name = match canonical_host(qname.trim_end_matches('.')) {
            Ok(n) => n,
            Err(e) => {
                let reason = format!("not a valid host name: {e}");
                if !self.audit_deny(client, &qname, qtype, &reason, false) {
                    return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
                }
                return encode(denied(), &request, udp);
            }
        };
        // The agent API's name: answered here for every agent, never asked upstream.
        if self.agent_api && name == crate::proxy::agent_api::NAME {
            let answers = match qtype {
                RecordType::A => vec![Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A(rdata::A(crate::proxy::agent_api::ADDR)),
                )],
                _ => Vec::new(),
            };
            return encode(reply(ResponseCode::NoError, answers), &request, udp);
        }
        // A placeholder in a name is a credential on its way out through DNS: never asked
        // upstream, whatever the policy (a placeholder has no business in a name).
        if let Some(c) = self
            .credentials
            .as_ref()
            .and_then(|v| v.placeholder_in(name.as_bytes()))
        {
            let reason = format!(
                "credential '{}' may only be sent to {}; a DNS name never carries it",
                c.name,
                c.hosts_text()
            );
            tracing::warn!(agent = %client.agent.name, pid = client.pid, comm = %client.comm, "credential leak refused: {reason}");
            let recorded = self.decisions.record(
                client
                    .event(EventKind::CredentialLeak)
                    .dns_name(&name)
                    .dns_type(qtype.to_string())
                    .policy_result(PolicyResult::Deny)
                    .matched_rule(format!("credential:{}", c.name))
                    .reason(reason),
            );
            if !recorded {
                return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
            }
            return encode(denied(), &request, udp);
        }
        let policy = client.agent.policy();
        let dry_run = policy.mode() == Mode::DryRun;
        let matched = crate::metrics::timed(|| policy.host_match(&name));
        if matched == HostMatch::None {
            let reason = format!("no rule of agent '{}' can allow {name}", client.agent.name);
            if !self.audit_deny(client, &name, qtype, &reason, dry_run) {
                return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
            }
            if !dry_run {
                return encode(denied(), &request, udp);
            }
        }
        if matches!(qtype, RecordType::HTTPS | RecordType::SVCB) {
            return encode(reply(ResponseCode::NoError, Vec::new()), &request, udp);
        }
        if matched == HostMatch::Wildcard
            && let Some(refused) = self.wildcard_refusal(client, &policy, &name, qtype)
        {
            let (why, reason) = refused;
            if !self.audit_deny(client, &name, qtype, &reason, dry_run) {
                return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
            }
            if !dry_run {
                let refused = match why {
                    exfil::Refusal::Type(_) => blocked(
                        reply(ResponseCode::Refused, Vec::new()),
                        &request,
                        &client.agent.name,
                    ),
                    _ => denied(),
                };
                return encode(refused, &request, udp);
            }
        }

        let (code, mut answers) = match self.resolve(&name, query).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(agent = %client.agent.name, %name, "upstream DNS failed: {e}");
                return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
            }
        };
        if matched != HostMatch::Exact && !self.strip_internal(client, &name, qtype, &mut answers) {
            return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
        }
        for r in &mut answers {
            r.ttl = r.ttl.min(self.max_ttl);
        }
        if !self.learn(
            client,
            &name,
            qtype,
            matched == HostMatch::Exact,
            &answers,
            query.name(),
        ) {
            // An answer the kernel could not learn would only lead to a refused connect.
            return encode(reply(ResponseCode::ServFail, Vec::new()), &request, udp);
        }
        encode(reply(code, answers), &request, udp)
    }

    /// The limits on a name allowed only through a wildcard (see `exfil`): the refusal and
    /// its audit reason, counted in `enforcer_dns_wildcard_refused_total`.
    fn wildcard_refusal(
        &self,
        client: &Caller,
        policy: &crate::policy::Policy,
        name: &str,
        qtype: RecordType,
    ) -> Option<(exfil::Refusal, String)> {
        let scope = policy.wildcard_scope(name);
        let refusal = if exfil::type_allowed(qtype) {
            None
        } else {
            Some(exfil::Refusal::Type(qtype))
        }
        .or_else(|| {
            (!scope.labels_any)
                .then(|| exfil::label_refusal(&scope.chosen))
                .flatten()
        })
        .or_else(|| {
            self.names.spend(
                client.agent.id,
                &scope.pattern,
                name,
                std::time::Instant::now(),
            )
        })?;
        crate::metrics::dns_wildcard_refused(&client.agent.name, refusal.kind());
        let reason = refusal.describe(&scope.pattern);
        Some((refusal, reason))
    }

    /// The answer records for an allowed name: `dns.static` first, then the upstreams.
    async fn resolve(
        &self,
        name: &str,
        query: &Query,
    ) -> Result<(ResponseCode, Vec<Record>), String> {
        let qtype = query.query_type();
        if let Some(ips) = self.statics.get(name) {
            let ttl = STATIC_TTL.min(self.max_ttl);
            let answers = ips
                .iter()
                .filter_map(|ip| match (ip, qtype) {
                    (IpAddr::V4(v4), RecordType::A) => Some(RData::A(rdata::A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(rdata::AAAA(*v6))),
                    _ => None,
                })
                .map(|data| Record::from_rdata(query.name().clone(), ttl, data))
                .collect();
            return Ok((ResponseCode::NoError, answers));
        }
        let response = client::ask_any(query, &self.upstreams, name)
            .await
            .map_err(|e| e.to_string())?;
        let code = response.metadata.response_code;
        let mut answers = response.answers.clone();
        if matches!(qtype, RecordType::A | RecordType::AAAA) {
            // Follow a chain the upstream left unfinished.
            for _ in 0..MAX_CHAIN {
                let Some(target) = dangling_cname(&answers, query.name(), qtype) else {
                    break;
                };
                let next = Query::query(target, qtype);
                match client::ask_any(&next, &self.upstreams, name).await {
                    Ok(m) if !m.answers.is_empty() => answers.extend(m.answers),
                    _ => break,
                }
            }
        }
        Ok((code, answers))
    }

    /// Removes internal addresses from a wildcard-matched answer, auditing each. False when
    /// a record could not be written in strict mode: the answer must then be refused.
    fn strip_internal(
        &self,
        client: &Caller,
        name: &str,
        qtype: RecordType,
        answers: &mut Vec<Record>,
    ) -> bool {
        let mut recorded = true;
        answers.retain(|r| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return true,
            };
            // Every spelling counts: NAT64 and 6to4 forms of an internal IPv4 address are that
            // address.
            let ip = crate::addr::canonical(ip);
            if let Some(why) = crate::addr::internal(ip)
                && !crate::addr::within(ip, &self.allow_internal)
            {
                let reason = format!(
                    "stripped internal answer {ip} ({why}) for {name}: the name is allowed only by \
                     a wildcard (list the CIDR in dns.allow_internal_answers, or name the host exactly)"
                );
                tracing::warn!(agent = %client.agent.name, "{reason}");
                recorded &= self.audit_dns(client, name, qtype, PolicyResult::Deny, &reason);
                return false;
            }
            true
        });
        recorded
    }

    /// Puts the answer's addresses into the agent's allowlist and name table. False when the
    /// agent's quota of learned addresses is full: the answer is then refused.
    fn learn(
        &self,
        client: &Caller,
        name: &str,
        qtype: RecordType,
        exact: bool,
        answers: &[Record],
        qname: &Name,
    ) -> bool {
        let mut probe = Message::new(0, MessageType::Response, OpCode::Query);
        probe.add_answers(answers.iter().cloned());
        let addrs = client::addresses(&probe, qname);
        let now = crate::bpf::boot_ns();
        for a in &addrs {
            let ttl = a.ttl.clamp(MIN_TTL, self.max_ttl);
            let expires = now + u64::from(ttl) * 1_000_000_000;
            let ip = crate::addr::canonical(a.ip);
            // An internal answer the operator let through (`dns.allow_internal_answers`) is
            // reachable like a name written exactly: the kernel's loopback rule asks for an
            // explicit entry, and the proxy judges the port by the policy as for any name.
            let explicit = exact
                || (crate::addr::internal(ip).is_some()
                    && crate::addr::within(ip, &self.allow_internal));
            match self
                .kernel
                .learn_allow(client.agent.id, ip, expires, explicit, self.max_learned)
            {
                Ok(()) => client.agent.learn(name, ip, expires, exact),
                Err(e @ BpfError::Quota { .. }) => {
                    // One record per agent per interval, with how many were refused: a
                    // flooding agent must not flood the log too.
                    if let Some(refused) = client.agent.quota_notice() {
                        let reason =
                            format!("{e} ({refused} answers refused since the last record)");
                        tracing::warn!(agent = %client.agent.name, "{reason}");
                        let _ = self.audit_dns(client, name, qtype, PolicyResult::Deny, &reason);
                    }
                    return false;
                }
                Err(e) => {
                    tracing::warn!(agent = %client.agent.name, %ip, "cannot learn the address: {e}; connects to it are refused");
                }
            }
        }
        true
    }

    /// Records a refused (or, in dry run, would-be refused) name. False when the record could
    /// not be written in strict mode.
    fn audit_deny(
        &self,
        client: &Caller,
        name: &str,
        qtype: RecordType,
        reason: &str,
        dry_run: bool,
    ) -> bool {
        let result = if dry_run {
            tracing::warn!(agent = %client.agent.name, "would be denied (dry-run): {reason}");
            PolicyResult::WouldDeny
        } else {
            tracing::info!(agent = %client.agent.name, pid = client.pid, comm = %client.comm, "DNS denied: {reason}");
            PolicyResult::Deny
        };
        self.audit_dns(client, name, qtype, result, reason)
    }

    fn audit_dns(
        &self,
        client: &Caller,
        name: &str,
        qtype: RecordType,
        result: PolicyResult,
        reason: &str,
    ) -> bool {
        self.decisions.record(
            client
                .event(EventKind::Dns)
                .dns_name(name)
                .dns_type(qtype.to_string())
                .policy_result(result)
                .reason(reason),
        )
    }
}

/// The target of a CNAME chain from `name` that has no address of `qtype` in `answers`.
fn dangling_cname(answers: &[Record], name: &Name, qtype: RecordType) -> Option<Name> {
    let mut current = name.to_lowercase();
    for _ in 0..=answers.len() {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(t) if r.name.to_lowercase() == current => Some(t.0.to_lowercase()),
            _ => None,
        });
        match next {
            Some(n) => current = n,
            None => break,
        }
    }
    if current == name.to_lowercase() {
        return None;
    }
    let has_address = answers
        .iter()
        .any(|r| r.name.to_lowercase() == current && r.record_type() == qtype);
    (!has_address).then_some(current)
}

/// The Extended DNS Error (RFC 8914) option code.
const EDNS_EXTENDED_ERROR: u16 = 15;
/// Its INFO-CODE "Blocked": the domain is blocked by the operator's policy.
const EDE_BLOCKED: u16 = 15;

/// Adds an Extended DNS Error "Blocked" naming the agent's policy, when the client sent EDNS
/// (a reply carries an OPT record only if the query did, RFC 6891).
fn blocked(mut reply: Message, request: &Message, agent: &str) -> Message {
    let Some(asked) = &request.edns else {
        return reply;
    };
    let text = format!("denied by egress policy (agent {agent})");
    let mut payload = EDE_BLOCKED.to_be_bytes().to_vec();
    payload.extend_from_slice(text.as_bytes());
    let mut edns = Edns::new();
    edns.set_max_payload(asked.max_payload().max(512));
    edns.options_mut()
        .insert(EdnsOption::Unknown(EDNS_EXTENDED_ERROR, payload));
    reply.set_edns(edns);
    reply
}

/// Encodes a reply; over UDP, one larger than the client can take is truncated (TC set).
fn encode(reply: Message, request: &Message, udp: bool) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    let limit = request
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()).clamp(512, 4096));
    if udp && bytes.len() > limit {
        return reply.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// Serves UDP queries until the socket fails.
pub async fn serve_udp(socket: UdpSocket, resolver: Arc<Resolver>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("resolver receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (socket, resolver) = (socket.clone(), resolver.clone());
        tokio::spawn(async move {
            let client = resolver
                .kernel
                .dns_client(peer)
                .and_then(|c| Caller::from_record(&resolver.registry, c.agent, c.pid, &c.comm));
            if let Some(reply) = resolver.answer(client.as_ref(), &query, true).await {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
    }
}

/// Serves DNS over TCP until the listener fails.
pub async fn serve_tcp(listener: TcpListener, resolver: Arc<Resolver>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let resolver = resolver.clone();
                tokio::spawn(async move { serve_tcp_conn(stream, peer, resolver).await });
            }
            Err(e) => {
                tracing::warn!("resolver accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_tcp_conn(mut stream: TcpStream, peer: SocketAddr, resolver: Arc<Resolver>) {
    // The kernel recorded the connect (redirected from port 53, or straight to us).
    let client = resolver
        .kernel
        .take_orig(peer)
        .filter(|o| o.flags & enforcer_common::orig_flags::DNS != 0)
        .and_then(|o| Caller::from_record(&resolver.registry, o.agent, o.pid, &o.comm));
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        let mut query = vec![0u8; len];
        if tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .is_err()
        {
            return;
        }
        let Some(reply) = resolver.answer(client.as_ref(), &query, false).await else {
            return;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        if stream.write_all(&reply_len.to_be_bytes()).await.is_err()
            || stream.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agents::{Agent, Origin},
        audit::AuditLog,
        config::SecurityMode,
        policy::Policy,
    };

    /// A kernel with no records, whose allowlist accepts everything.
    struct NoKernel;

    impl DnsKernel for NoKernel {
        fn dns_client(&self, _: SocketAddr) -> Option<enforcer_common::DnsClient> {
            None
        }
        fn take_orig(&self, _: SocketAddr) -> Option<enforcer_common::OrigDst> {
            None
        }
        fn learn_allow(
            &self,
            _: u32,
            _: IpAddr,
            _: u64,
            _: bool,
            _: usize,
        ) -> Result<(), BpfError> {
            Ok(())
        }
    }

    /// A resolver for one agent allowing `api.test`, with its audit log and the caller.
    fn resolver(dir: &std::path::Path, mode: SecurityMode) -> (Resolver, AuditLog, Caller) {
        let audit = crate::audit::testing::open(dir);
        let policy = "rules:\n  - name: api\n    allow: { url: \"api.test\" }\n";
        let agent = Arc::new(Agent::new(
            "dns-agent".into(),
            1,
            Origin::Configured,
            "test.yaml".into(),
            "/".into(),
            Arc::new(Policy::from_yaml(policy.as_bytes(), "test").unwrap()),
        ));
        let registry = Arc::new(Registry::default());
        registry.insert(agent.clone());
        let config = crate::config::DnsConfig {
            static_hosts: BTreeMap::from([(
                "api.test".to_owned(),
                vec!["192.0.2.7".parse().unwrap()],
            )]),
            ..crate::config::DnsConfig::default()
        };
        let resolver = Resolver::new(
            Arc::new(NoKernel),
            registry,
            Decisions::new(audit.clone(), mode),
            &config,
            Vec::new(),
        );
        let caller = Caller {
            agent,
            pid: 7,
            comm: Arc::from("dig"),
            exe: None,
        };
        (resolver, audit, caller)
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    async fn code(r: &Resolver, caller: &Caller, name: &str) -> ResponseCode {
        let reply = r.answer(Some(caller), &query(name), true).await.unwrap();
        Message::from_vec(&reply).unwrap().metadata.response_code
    }

    #[tokio::test]
    async fn a_denial_keeps_nxdomain_and_says_why_in_an_extended_dns_error() {
        let dir = tempfile::tempdir().unwrap();
        let (r, audit, caller) = resolver(dir.path(), SecurityMode::Strict);
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("evil.test.").unwrap(),
            RecordType::AAAA,
        ));
        m.set_edns(Edns::new());
        let reply = r
            .answer(Some(&caller), &m.to_vec().unwrap(), true)
            .await
            .unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        let ede = reply
            .edns
            .as_ref()
            .and_then(|e| e.option(EDNS_EXTENDED_ERROR.into()))
            .expect("an Extended DNS Error");
        let EdnsOption::Unknown(_, payload) = ede else {
            panic!("{ede:?}")
        };
        assert_eq!(&payload[..2], &EDE_BLOCKED.to_be_bytes());
        assert_eq!(
            std::str::from_utf8(&payload[2..]).unwrap(),
            "denied by egress policy (agent dns-agent)"
        );
        // Without EDNS in the query, the reply carries no OPT record.
        let reply = r
            .answer(Some(&caller), &query("evil.test."), true)
            .await
            .unwrap();
        assert!(Message::from_vec(&reply).unwrap().edns.is_none());
        // The records tell the query types apart.
        let records = crate::audit::testing::records(&audit, dir.path()).await;
        let types: Vec<&str> = records
            .iter()
            .filter(|r| r["event"] == "dns")
            .map(|r| r["dns_type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["AAAA", "A"]);
    }

    #[tokio::test]
    async fn a_denial_that_cannot_be_audited_is_servfail_in_strict_mode_only() {
        let dir = tempfile::tempdir().unwrap();
        let (strict, audit, caller) = resolver(dir.path(), SecurityMode::Strict);
        assert_eq!(
            code(&strict, &caller, "evil.test.").await,
            ResponseCode::NXDomain
        );
        assert_eq!(
            code(&strict, &caller, "api.test.").await,
            ResponseCode::NoError
        );
        // The log is closed: no record can be written any more.
        audit.close();
        assert_eq!(
            code(&strict, &caller, "evil.test.").await,
            ResponseCode::ServFail
        );
        // An allowed answer writes no record, so it is unaffected.
        assert_eq!(
            code(&strict, &caller, "api.test.").await,
            ResponseCode::NoError
        );

        let dir = tempfile::tempdir().unwrap();
        let (permissive, audit, caller) = resolver(dir.path(), SecurityMode::Permissive);
        audit.close();
        assert_eq!(
            code(&permissive, &caller, "evil.test.").await,
            ResponseCode::NXDomain
        );
    }

    fn a(name: &str, ip: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            30,
            RData::A(rdata::A(ip.parse().unwrap())),
        )
    }

    fn cname(name: &str, target: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            30,
            RData::CNAME(rdata::CNAME(Name::from_ascii(target).unwrap())),
        )
    }

    #[test]
    fn unfinished_chains_are_detected() {
        let q = Name::from_ascii("www.x.test.").unwrap();
        let chain = vec![cname("www.x.test.", "edge.cdn.test.")];
        assert_eq!(
            dangling_cname(&chain, &q, RecordType::A),
            Some(Name::from_ascii("edge.cdn.test.").unwrap())
        );
        let done = vec![
            cname("www.x.test.", "edge.cdn.test."),
            a("edge.cdn.test.", "192.0.2.1"),
        ];
        assert_eq!(dangling_cname(&done, &q, RecordType::A), None);
        assert_eq!(
            dangling_cname(&[a("www.x.test.", "192.0.2.1")], &q, RecordType::A),
            None
        );
        // A loop ends.
        let looped = vec![
            cname("www.x.test.", "b.test."),
            cname("b.test.", "www.x.test."),
        ];
        let _ = dangling_cname(&looped, &q, RecordType::A);
    }

    #[test]
    fn oversized_udp_replies_are_truncated() {
        let mut request = Message::new(7, MessageType::Query, OpCode::Query);
        request.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        let mut reply = Message::response(7, OpCode::Query);
        reply.add_queries(request.queries.clone());
        for i in 0..60 {
            reply.add_answer(a("x.test.", &format!("192.0.2.{i}")));
        }
        let udp = Message::from_vec(&encode(reply.clone(), &request, true).unwrap()).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = Message::from_vec(&encode(reply, &request, false).unwrap()).unwrap();
        assert_eq!(tcp.answers.len(), 60);
    }
}
