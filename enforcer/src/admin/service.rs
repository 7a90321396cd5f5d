//! The daemon side of the admin API: what each request does, with the refusals typed by
//! their cause (403 permission, 404 unknown, 409 conflict, 400 bad input).

use std::{path::Path, sync::Arc};

use super::{
    Handler, Peer, Refusal,
    api::{EnrolRequest, EnrolResponse, ReloadResponse, Target, UnenrolRequest, UnenrolResponse},
};
use crate::{
    agents::{
        Registry,
        lifecycle::{AdHocRefusal, Lifecycle},
    },
    cgroup::CgroupError,
    config::validate_agent_name,
    enrol::{EnrolError, Enroller},
    status::{Reporter, Status},
};

/// What the admin API acts on.
pub struct Service {
    pub lifecycle: Arc<Lifecycle>,
    pub enroller: Arc<Enroller>,
    pub registry: Arc<Registry>,
    pub reporter: Arc<Reporter>,
    /// The system roots plus the local CA, for `enforcer exec` to point TLS clients at.
    pub ca_bundle: Option<std::path::PathBuf>,
    pub credentials: Arc<crate::credentials::Vault>,
    pub approvals: Arc<crate::approvals::Approvals>,
}

impl Handler for Service {
    fn peer_is_enrolled(&self, pid: u32) -> bool {
        match self.enroller.hierarchy.of_pid(pid) {
            Ok(cg) => self.enroller.is_enrolled(&cg),
            // Cannot tell: refuse (fail closed).
            Err(_) => true,
        }
    }

    fn status(&self) -> Status {
        self.reporter.status()
    }

    async fn enrol(&self, peer: &Peer, req: EnrolRequest) -> Result<EnrolResponse, Refusal> {
        validate_agent_name(&req.agent).map_err(Refusal::BadInput)?;
        let agent = match (&req.policy_yaml, self.registry.get(&req.agent)) {
            (Some(yaml), _) => {
                let user = (!peer.is_root()).then(|| {
                    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
                        .ok()
                        .flatten()
                        .map_or_else(|| format!("uid{}", peer.uid), |u| u.name)
                });
                self.lifecycle
                    .register_adhoc(&req.agent, yaml, user.as_deref())
                    .await
                    .map_err(adhoc_refusal)?
            }
            (None, Some(a)) => a,
            (None, None) => {
                return Err(Refusal::NotFound(format!(
                    "no agent named '{}'; configured agents: {} (or pass --policy FILE to register an ad-hoc agent)",
                    req.agent,
                    self.registry.names_list()
                )));
            }
        };
        let (cgroup, warnings) = match &req.target {
            Target::SelfProcess => {
                if !peer.still_alive() {
                    return Err(Refusal::NotFound("the calling process went away".into()));
                }
                let enrolled = self
                    .enroller
                    .enrol_pid(peer.pid, &agent)
                    .map_err(enrol_refusal)?;
                // The pid could have been recycled between the move and now only if the
                // caller died; then its pidfd says so.
                if !peer.still_alive() {
                    return Err(Refusal::NotFound(
                        "the calling process went away during enrolment".into(),
                    ));
                }
                enrolled
            }
            Target::Pid(pid) => self
                .enroller
                .enrol_pid(*pid, &agent)
                .map_err(enrol_refusal)?,
            Target::Cgroup(path) => (
                self.enroller
                    .enrol_cgroup(Path::new(path), &agent)
                    .map_err(enrol_refusal)?,
                Vec::new(),
            ),
        };
        for w in &warnings {
            tracing::warn!(agent = %agent.name, "{w}");
        }
        let cgroup_id = self.enroller.verified_id(&cgroup).map_err(enrol_refusal)?;
        Ok(EnrolResponse {
            agent: agent.name.clone(),
            cgroup: cgroup.display().to_string(),
            warnings,
            ca_bundle: self.ca_bundle.as_ref().map(|p| p.display().to_string()),
            killed: agent.is_killed(),
            cgroup_id,
            env: self.credentials.env_of(&agent.name).into_iter().collect(),
        })
    }

    fn unenrol(&self, _peer: &Peer, req: UnenrolRequest) -> Result<UnenrolResponse, Refusal> {
        let cgroup = match req.target {
            Target::Pid(pid) => self.enroller.unenrol_pid(pid),
            Target::Cgroup(path) => self.enroller.unenrol_cgroup(Path::new(&path)),
            Target::SelfProcess => {
                return Err(Refusal::Forbidden("a process cannot unenrol itself".into()));
            }
        }
        .map_err(enrol_refusal)?;
        Ok(UnenrolResponse {
            cgroup: cgroup.display().to_string(),
        })
    }

    fn credentials(&self) -> super::api::CredentialsReport {
        super::api::CredentialsReport {
            credentials: self
                .credentials
                .all()
                .iter()
                .map(|c| {
                    let reason = c.unavailable();
                    super::api::CredentialView {
                        agent: c.agent.clone(),
                        name: c.name.clone(),
                        env: c.env.clone(),
                        hosts: c.hosts.iter().map(ToString::to_string).collect(),
                        binaries: c.binaries.iter().map(|b| b.display().to_string()).collect(),
                        source: c.source.display().to_string(),
                        available: reason.is_none(),
                        reason,
                        last_used: c.last_used().and_then(|t| {
                            jiff::Timestamp::from_second(t).ok().map(|t| t.to_string())
                        }),
                        placeholder: c.placeholder.clone(),
                    }
                })
                .collect(),
        }
    }

    fn approvals(&self) -> super::api::ApprovalsReport {
        super::api::ApprovalsReport {
            approvals: self.approvals.list(),
        }
    }

    fn answer(&self, peer: &Peer, a: super::api::ApprovalAnswer) -> Result<(), Refusal> {
        use crate::approvals::{ApprovalError, Scope};
        let result = if a.approve {
            let scope = match a.for_secs {
                Some(0) | None => Scope::Once,
                Some(s) => Scope::For(s),
            };
            self.approvals.approve(&a.id, peer.uid, scope)
        } else {
            let reason = a.reason.unwrap_or_else(|| "no reason given".into());
            self.approvals.reject(&a.id, peer.uid, &reason)
        };
        result.map_err(|e| match e {
            ApprovalError::NotFound(_) => Refusal::NotFound(e.to_string()),
            ApprovalError::Full { .. } => Refusal::Conflict(e.to_string()),
        })
    }

    async fn reload(&self) -> Result<ReloadResponse, Refusal> {
        Ok(ReloadResponse {
            agents: self.lifecycle.reload("admin API").await,
        })
    }
}

fn adhoc_refusal(e: AdHocRefusal) -> Refusal {
    match e {
        AdHocRefusal::Configured { .. } | AdHocRefusal::WasConfigured(_) => {
            Refusal::Conflict(e.to_string())
        }
        AdHocRefusal::NotRoot(_) | AdHocRefusal::Prefix { .. } | AdHocRefusal::NotDenyAll(_) => {
            Refusal::Forbidden(e.to_string())
        }
        AdHocRefusal::BadPolicy(_) => Refusal::BadInput(e.to_string()),
        AdHocRefusal::Failed(_) => Refusal::Internal(e.to_string()),
    }
}

fn enrol_refusal(e: EnrolError) -> Refusal {
    let message = e.to_string();
    match e {
        EnrolError::Root(_)
        | EnrolError::OwnCgroup { .. }
        | EnrolError::OwnProcess(_)
        | EnrolError::Init(_) => Refusal::Forbidden(message),
        EnrolError::NoProcess(_) | EnrolError::NotEnrolled(_) => Refusal::NotFound(message),
        EnrolError::Taken { .. } | EnrolError::PidNotEnrolled { .. } => Refusal::Conflict(message),
        EnrolError::Cgroup(CgroupError::Missing { .. } | CgroupError::ProcCgroup { .. }) => {
            Refusal::NotFound(message)
        }
        EnrolError::Cgroup(CgroupError::BadPath(_)) => Refusal::BadInput(message),
        EnrolError::Cgroup(_)
        | EnrolError::Bpf(_)
        | EnrolError::Persist { .. }
        | EnrolError::NotAttached { .. } => Refusal::Internal(message),
    }
}
