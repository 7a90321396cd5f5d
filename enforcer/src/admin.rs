//! The admin API: HTTP/JSON over a Unix socket in `runtime_dir`, served with hyper.
//!
//! Who may do what:
//! - a process inside an enrolled cgroup may do nothing, root included: an agent can never
//!   unenrol itself or change its own enforcement;
//! - root may do everything;
//! - any other peer (the socket is mode 0660, group `admin_group`) may only enrol its own
//!   process. The daemon takes the peer's pid from `SO_PEERCRED` and pins it with a pidfd, so
//!   a recycled pid cannot be moved in its place.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

pub mod api;
pub mod service;

use api::{ErrorBody, Target};

/// Largest request body accepted (ad-hoc policies are at most 1 MiB).
const MAX_BODY: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create the admin socket {path}: {io}", io = crate::sys::io_text(source))]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "enforcer daemon is not running (cannot connect to {path}: {}); start it with {start}",
        crate::sys::io_text(source)
    )]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
        start: String,
    },
    #[error("permission denied on {path}: run as root or as a member of the admin group")]
    Permission { path: PathBuf },
    #[error("admin request failed: {0}")]
    Transport(String),
    #[error("{message}")]
    Refused { status: u16, message: String },
}

/// Why the daemon refused an admin request; each kind has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// 403: the caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such agent, process or cgroup.
    #[error("{0}")]
    NotFound(String),
    /// 409: it conflicts with what is already there.
    #[error("{0}")]
    Conflict(String),
    /// 400: the request itself is wrong.
    #[error("{0}")]
    BadInput(String),
    /// 500: the daemon failed.
    #[error("{0}")]
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::Conflict(_) => StatusCode::CONFLICT,
            Refusal::BadInput(_) => StatusCode::BAD_REQUEST,
            Refusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// A pidfd for `pid`, when the kernel gave one: proof the process is the one that
    /// connected.
    pub pidfd: Option<Arc<OwnedFd>>,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Is the peer process still the one that connected? A pidfd refers to exactly one
    /// process, so if signalling it works the pid has not been recycled.
    pub fn still_alive(&self) -> bool {
        match &self.pidfd {
            // SAFETY: plain syscall on a valid pidfd; signal 0 only checks existence.
            Some(fd) => unsafe {
                libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), 0, 0usize, 0u32) == 0
            },
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }
}

/// What the daemon does for each request; implemented by [`service::Service`].
pub trait Handler: Send + Sync + 'static {
    /// Is this process inside an enrolled cgroup?
    fn peer_is_enrolled(&self, pid: u32) -> bool;
    fn status(&self) -> crate::status::Status;
    fn enrol(
        &self,
        peer: &Peer,
        req: api::EnrolRequest,
    ) -> impl Future<Output = Result<api::EnrolResponse, Refusal>> + Send;
    fn unenrol(
        &self,
        peer: &Peer,
        req: api::UnenrolRequest,
    ) -> Result<api::UnenrolResponse, Refusal>;
    fn reload(&self) -> impl Future<Output = Result<api::ReloadResponse, Refusal>> + Send;
    fn credentials(&self) -> api::CredentialsReport;
    fn approvals(&self) -> api::ApprovalsReport;
    fn answer(&self, peer: &Peer, answer: api::ApprovalAnswer) -> Result<(), Refusal>;
}

/// Binds the admin socket: mode 0660, group `admin_group` when given.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, AdminError> {
    let bind_err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    // A socket left by a killed daemon: remove it (the pid file check is the caller's).
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    if let Some(group) = group {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => {
                nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(g.gid))
                    .map_err(|e| bind_err(std::io::Error::from(e)))?;
            }
            _ => tracing::warn!(
                "admin_group '{group}' does not exist; only root can use the admin socket \
                 (create it with `groupadd {group}`)"
            ),
        }
    }
    Ok(listener)
}

/// Serves the admin API until the listener fails.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let Some(peer) = peer_of(&stream) else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let peer = peer.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&*handler, &peer, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("admin connection ended: {e}");
            }
        });
    }
}

fn peer_of(stream: &UnixStream) -> Option<Peer> {
    let cred = stream.peer_cred().ok()?;
    let pid = u32::try_from(cred.pid()?).ok()?;
    Some(Peer {
        pid,
        uid: cred.uid(),
        gid: cred.gid(),
        pidfd: peer_pidfd(stream, pid).map(Arc::new),
    })
}

/// `SO_PEERPIDFD` (Linux 6.5+), or `pidfd_open` of the credential's pid as a fallback.
fn peer_pidfd(stream: &UnixStream, pid: u32) -> Option<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if r == 0 && fd >= 0 {
        // SAFETY: the kernel handed us a new descriptor we now own.
        return Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // SAFETY: plain syscall; returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: as above.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

async fn route<H: Handler>(
    handler: &H,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if handler.peer_is_enrolled(peer.pid) {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "refused: process {} runs inside an enrolled cgroup; agents cannot change \
                 their own enforcement",
                peer.pid
            ),
        );
    }
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")),
    };
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/v1/status") => json(StatusCode::OK, &handler.status()),
        (&Method::GET, "/v1/credentials") => json(StatusCode::OK, &handler.credentials()),
        (&Method::GET, "/v1/approvals") => json(StatusCode::OK, &handler.approvals()),
        (&Method::POST, "/v1/approvals/answer") => {
            match serde_json::from_slice::<api::ApprovalAnswer>(&body) {
                Ok(a) => match handler.answer(peer, a) {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({ "ok": true })),
                    Err(e) => refused(&e),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, format!("bad answer: {e}")),
            }
        }
        (&Method::POST, "/v1/enrol") => match serde_json::from_slice::<api::EnrolRequest>(&body) {
            Ok(r) => {
                if !peer.is_root() && r.target != Target::SelfProcess {
                    return error(
                        StatusCode::FORBIDDEN,
                        "only root may enrol other processes or cgroups; a member of the admin \
                         group may only enrol itself (enforcer exec)"
                            .into(),
                    );
                }
                match handler.enrol(peer, r).await {
                    Ok(resp) => json(StatusCode::OK, &resp),
                    Err(e) => refused(&e),
                }
            }
            Err(e) => error(StatusCode::BAD_REQUEST, format!("bad enrol request: {e}")),
        },
        (&Method::POST, "/v1/unenrol") => {
            if !peer.is_root() {
                return error(StatusCode::FORBIDDEN, "only root may unenrol".into());
            }
            match serde_json::from_slice::<api::UnenrolRequest>(&body) {
                Ok(r) => match handler.unenrol(peer, r) {
                    Ok(resp) => json(StatusCode::OK, &resp),
                    Err(e) => refused(&e),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, format!("bad unenrol request: {e}")),
            }
        }
        (&Method::POST, "/v1/reload") => {
            if !peer.is_root() {
                return error(StatusCode::FORBIDDEN, "only root may reload".into());
            }
            match handler.reload().await {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => refused(&e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {} {}", parts.method, parts.uri.path()),
        ),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error: message })
}

fn refused(r: &Refusal) -> Response<Full<Bytes>> {
    error(r.status(), r.to_string())
}

/// A client of the admin API.
pub struct Client {
    path: PathBuf,
    /// How to start the daemon, for the "not running" error.
    start: String,
}

impl Client {
    /// The admin socket of this configuration.
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            path: config.admin_socket_path(),
            start: config.start_hint(),
        }
    }

    pub async fn get<R: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<R, AdminError> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    pub async fn post<B: Serialize, R: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, AdminError> {
        let body = serde_json::to_vec(body).map_err(|e| AdminError::Transport(e.to_string()))?;
        self.call(Method::POST, path, Bytes::from(body)).await
    }

    async fn call<R: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<R, AdminError> {
        let stream = UnixStream::connect(&self.path).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                AdminError::Permission {
                    path: self.path.clone(),
                }
            } else {
                AdminError::NotRunning {
                    path: self.path.clone(),
                    source,
                    start: self.start.clone(),
                }
            }
        })?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "enforcer")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| AdminError::Transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(AdminError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| AdminError::Transport(e.to_string()))
    }
}
