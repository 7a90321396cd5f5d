//! `enforcer exec`: run a command enrolled under an agent's policy.
//!
//! 1. ask the daemon to move this process into the agent's cgroup (so everything it execs and
//!    forks is enrolled), and check that it happened;
//! 2. close inherited descriptors beyond stdio (an inherited socket would escape the hooks);
//! 3. when run as root, drop to `--user`, or to the sudo caller; running CMD as root needs
//!    `--allow-root`;
//! 4. set `PR_SET_NO_NEW_PRIVS`, so setuid binaries cannot regain privileges;
//! 5. when the daemon may intercept TLS, point the usual CA-file variables
//!    ([`CA_BUNDLE_VARS`]) at its bundle of the system roots plus the local CA, so the
//!    command trusts intercepted connections without any change to the system store;
//! 6. exec CMD.
//!
//! Exit codes follow env(1): 125 when enforcer itself fails, 126 when CMD cannot be run, 127
//! when it is not found, and CMD's own status otherwise (it replaces this process).

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use nix::unistd::{Gid, Uid, User};

use crate::{
    admin::{
        Client,
        api::{EnrolRequest, EnrolResponse, Target},
    },
    cgroup::Hierarchy,
    config::Config,
    policy::Policy,
};

/// What `enforcer exec --help` says after the options.
pub const AFTER_HELP: &str = "\
As root, the command runs as --user USER, or as the sudo caller (SUDO_UID); running it as \
root needs --allow-root (root can leave its cgroup). HOME, USER and LOGNAME are set to the \
target user's; --env K=V sets more. When the daemon intercepts TLS, SSL_CERT_FILE, \
CURL_CA_BUNDLE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS, GIT_SSL_CAINFO, CARGO_HTTP_CAINFO, \
PIP_CERT, AWS_CA_BUNDLE and DENO_CERT point at its trust bundle.

Exit codes, as env(1): 125 enforcer failed (nothing was run), 126 the command cannot be run, \
127 the command was not found, otherwise the command's own status.";

pub mod sandbox;

pub const EXIT_ENFORCER_FAILED: u8 = 125;
pub const EXIT_CANNOT_RUN: u8 = 126;
pub const EXIT_NOT_FOUND: u8 = 127;

/// Variables that TLS clients read for their CA file: OpenSSL and most tools, curl, Python
/// requests, Node.js (extra CAs), git, cargo, pip, the AWS SDKs and CLI, Deno.
pub const CA_BUNDLE_VARS: [&str; 9] = [
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
];

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Agent whose policy applies.
    #[arg(long)]
    pub agent: String,
    /// Register an ad-hoc agent NAME with this policy (the file's bytes are sent to the
    /// daemon, which keeps them in its state directory). Not allowed for configured agents.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Run CMD as this user (when enforcer runs as root); not root: that is --allow-root.
    #[arg(long, conflicts_with = "allow_root")]
    pub user: Option<String>,
    /// Run CMD as root. Risky: root (or CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN) can leave
    /// its cgroup and escape enforcement.
    #[arg(long)]
    pub allow_root: bool,
    /// Run CMD even when fd 0, 1 or 2 is an inet socket (made outside the agent's cgroup,
    /// where no hook sees it).
    #[arg(long)]
    pub allow_socket_stdio: bool,
    /// Set a variable in CMD's environment (after HOME, USER, LOGNAME and the CA variables);
    /// repeat for several.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Who CMD runs as.
#[derive(Debug)]
enum RunAs {
    /// Keep the current identity (not root, or root with --allow-root).
    Current,
    User {
        uid: Uid,
        gid: Gid,
        name: String,
        home: PathBuf,
    },
}

impl RunAs {
    /// The user CMD runs as, for messages.
    fn describe(&self) -> String {
        match self {
            RunAs::User { name, .. } => name.clone(),
            RunAs::Current => {
                let uid = nix::unistd::getuid();
                User::from_uid(uid)
                    .ok()
                    .flatten()
                    .map_or_else(|| format!("uid {uid}"), |u| u.name)
            }
        }
    }
}

/// `K=V`, with a non-empty name without `=` or NUL.
fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("--env {s}: expected NAME=VALUE"))?;
    if k.is_empty() || k.contains('\0') || v.contains('\0') {
        return Err(format!(
            "--env {s}: the name must not be empty, nor contain NUL"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("enforcer exec: {message}");
    ExitCode::from(EXIT_ENFORCER_FAILED)
}

pub fn run(args: ExecArgs, config: &Config) -> ExitCode {
    if !args.allow_socket_stdio
        && let Err(e) = sandbox::check_stdio()
    {
        return fail(e);
    }
    let run_as = match run_as(&args) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let policy_yaml = match &args.policy {
        Some(path) => match read_policy(path) {
            Ok(text) => Some(text),
            Err(e) => return fail(e),
        },
        None => None,
    };

    // 1. Enrol this very process.
    let req = EnrolRequest {
        agent: args.agent.clone(),
        target: Target::SelfProcess,
        policy_yaml,
    };
    let client = Client::new(config);
    let response = {
        let runtime = match super::runtime() {
            Ok(r) => r,
            Err(e) => return fail(format!("cannot start the async runtime: {e}")),
        };
        let result = runtime.block_on(client.post::<_, EnrolResponse>("/v1/enrol", &req));
        // Gone before descriptors are closed: the runtime owns its epoll and socket fds.
        drop(runtime);
        match result {
            Ok(r) => r,
            Err(e) => return fail(e),
        }
    };
    for w in &response.warnings {
        eprintln!("enforcer exec: warning: {w}");
    }
    if response.killed {
        eprintln!(
            "enforcer exec: warning: agent '{}' is stopped by the kill switch: every connection \
             the command makes will be refused until `enforcer revive` (see `enforcer status`)",
            response.agent
        );
    }
    if let Err(e) = check_enrolled(Path::new(&response.cgroup), response.cgroup_id) {
        return fail(e);
    }

    // 2. No inherited descriptors beyond stdio.
    // SAFETY: plain syscall; closes descriptors this process owns and no longer uses (the
    // runtime is shut down).
    let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed != 0 {
        return fail(format!(
            "cannot close inherited descriptors: {}",
            std::io::Error::last_os_error()
        ));
    }

    // 3. Identity.
    if let Err(e) = drop_privileges(&run_as) {
        return fail(e);
    }

    // 4. No privilege regained through setuid binaries or file capabilities.
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        return fail(format!("cannot set no_new_privs: {e}"));
    }
    // What the cgroup hooks cannot give: no borrowing of other processes' sockets, no
    // abstract unix sockets outside, only the socket families the hooks see.
    if let Err(e) = sandbox::landlock().and_then(|()| sandbox::seccomp()) {
        return fail(e);
    }

    // 5. Trust for intercepted TLS. Never point the variables at a file the command cannot
    // read: every HTTPS call would then fail, spliced hosts included.
    if let Some(bundle) = &response.ca_bundle {
        if let Err(e) = std::fs::File::open(bundle) {
            return fail(format!(
                "the command's user ({}) cannot read the CA bundle {bundle}: {}. The daemon \
                 writes it mode 0644 in a 0755 runtime_dir; check that every directory above \
                 it can be searched by that user, or restart the daemon to rewrite it",
                run_as.describe(),
                crate::sys::io_text(&e)
            ));
        }
        for var in CA_BUNDLE_VARS {
            // SAFETY: single-threaded at this point (the runtime is shut down), so changing
            // the environment cannot race another thread.
            unsafe { std::env::set_var(var, bundle) };
        }
    }

    // Credentials: the agent holds placeholders, replacing whatever real value this shell
    // had in those variables; the proxy swaps the secret in where it may go.
    for (k, v) in &response.env {
        // SAFETY: single-threaded at this point (the runtime is shut down), so changing the
        // environment cannot race another thread.
        unsafe { std::env::set_var(k, v) };
    }

    for (k, v) in &args.env {
        // SAFETY: single-threaded at this point (the runtime is shut down), so changing the
        // environment cannot race another thread.
        unsafe { std::env::set_var(k, v) };
    }

    // 6. Exec.
    exec(&args.command, &run_as)
}

fn run_as(args: &ExecArgs) -> Result<RunAs, String> {
    let euid = nix::unistd::geteuid();
    let lookup = |name: &str| -> Result<RunAs, String> {
        let user = User::from_name(name)
            .map_err(|e| format!("cannot look up user '{name}': {e}"))?
            .ok_or_else(|| format!("no user named '{name}'"))?;
        Ok(RunAs::User {
            uid: user.uid,
            gid: user.gid,
            name: user.name,
            home: user.dir,
        })
    };
    if !euid.is_root() {
        return match &args.user {
            Some(name) => match lookup(name)? {
                RunAs::User { uid, .. } if uid == euid => Ok(RunAs::Current),
                _ => Err(format!(
                    "--user {name} needs root; run enforcer exec with sudo"
                )),
            },
            None => Ok(RunAs::Current),
        };
    }
    if let Some(name) = &args.user {
        return match lookup(name)? {
            RunAs::User { uid, .. } if uid.is_root() => Err(root_refusal(name)),
            user => Ok(user),
        };
    }
    if let Ok(uid) = std::env::var("SUDO_UID") {
        let uid: u32 = uid
            .parse()
            .map_err(|_| format!("SUDO_UID '{uid}' is not a number"))?;
        if uid != 0 {
            let user = User::from_uid(Uid::from_raw(uid))
                .map_err(|e| format!("cannot look up SUDO_UID {uid}: {e}"))?
                .ok_or_else(|| format!("SUDO_UID {uid} has no passwd entry; pass --user"))?;
            let gid = std::env::var("SUDO_GID")
                .ok()
                .and_then(|g| g.parse().ok())
                .map(Gid::from_raw)
                .unwrap_or(user.gid);
            return Ok(RunAs::User {
                uid: user.uid,
                gid,
                name: user.name,
                home: user.dir,
            });
        }
    }
    if args.allow_root {
        eprintln!(
            "enforcer exec: warning: running the command as root (--allow-root). Root, or any \
             process with CAP_NET_ADMIN, CAP_NET_RAW or CAP_SYS_ADMIN, can move itself out of \
             its cgroup or open raw sockets, and so escape enforcement"
        );
        return Ok(RunAs::Current);
    }
    Err(root_refusal("root"))
}

/// The refusal to run CMD as root without `--allow-root`, however root was asked for.
fn root_refusal(user: &str) -> String {
    format!(
        "refusing to run the command as {user} (uid 0): root can leave its cgroup and escape \
         enforcement. Pass --user USER to run it as another user, or --allow-root if you \
         accept the risk"
    )
}

fn read_policy(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Check locally first for a precise error with line and column.
    Policy::from_yaml(&bytes, &path.display().to_string()).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))
}

/// Confirms that this process now lives in the very cgroup the daemon verified: the same
/// path, and the same cgroup id (a cgroup removed and created again at that path would have
/// a new id and none of the programs). A populated cgroup cannot be removed, so once this
/// process is in it the id cannot change under it.
fn check_enrolled(expected: &Path, verified_id: u64) -> Result<(), String> {
    let hierarchy = Hierarchy::discover().map_err(|e| e.to_string())?;
    let own = hierarchy
        .of_pid(std::process::id())
        .map_err(|e| e.to_string())?;
    if own != expected {
        return Err(format!(
            "the daemon reported enrolment in {}, but this process is in {}; not running the \
             command unenforced",
            expected.display(),
            own.display()
        ));
    }
    let id = crate::cgroup::cgroup_id(&own).map_err(|e| e.to_string())?;
    if id != verified_id {
        return Err(format!(
            "this process is in {} with cgroup id {id}, but the daemon verified the programs \
             on cgroup id {verified_id} (the cgroup was created again meanwhile?); not running \
             the command unenforced",
            own.display()
        ));
    }
    Ok(())
}

fn drop_privileges(run_as: &RunAs) -> Result<(), String> {
    let RunAs::User {
        uid,
        gid,
        name,
        home,
    } = run_as
    else {
        return Ok(());
    };
    let cname = CString::new(name.as_bytes()).map_err(|_| format!("bad user name '{name}'"))?;
    nix::unistd::initgroups(&cname, *gid).map_err(|e| format!("initgroups({name}): {e}"))?;
    nix::unistd::setgid(*gid).map_err(|e| format!("setgid({gid}): {e}"))?;
    nix::unistd::setuid(*uid).map_err(|e| format!("setuid({uid}): {e}"))?;
    // Root must be gone for good.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("dropping root failed: setuid(0) still works".into());
    }
    // SAFETY: single-threaded at this point (the runtime is shut down), so changing the
    // environment cannot race another thread.
    unsafe {
        std::env::set_var("HOME", home);
        std::env::set_var("USER", name);
        std::env::set_var("LOGNAME", name);
    }
    Ok(())
}

fn exec(command: &[OsString], run_as: &RunAs) -> ExitCode {
    let args: Result<Vec<CString>, _> =
        command.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(args) = args else {
        return fail("the command contains a NUL byte");
    };
    let name = command[0].to_string_lossy().into_owned();
    let Some(path) = find_command(&command[0]) else {
        eprintln!("enforcer exec: {name}: command not found");
        return ExitCode::from(EXIT_NOT_FOUND);
    };
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return fail("the command path contains a NUL byte");
    };
    let err = nix::unistd::execv(&cpath, &args).unwrap_err();
    eprintln!(
        "enforcer exec: {name}: {} (as user {})",
        err.desc(),
        run_as.describe()
    );
    ExitCode::from(if err == nix::errno::Errno::ENOENT {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_RUN
    })
}

/// Finds CMD like the shell does: a name with a `/` is used as is, others are looked up in
/// `PATH`. A candidate that exists but cannot be run is returned (exec then gives 126); only
/// a name that exists nowhere gives `None` (127). `execvp` alone reports EACCES when some PATH
/// directory is unreadable to the new user, which would turn "not found" into 126.
fn find_command(cmd: &std::ffi::OsStr) -> Option<PathBuf> {
    if cmd.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(cmd));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut unreadable = None;
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(cmd);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => {
                use std::os::unix::fs::PermissionsExt as _;
                if meta.permissions().mode() & 0o111 != 0 {
                    return Some(candidate);
                }
                unreadable.get_or_insert(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                unreadable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    // Something by that name exists but is not runnable: let exec report why (126). A
    // directory we could not search proves nothing, so that alone is "not found".
    unreadable.filter(|c| c.exists())
}
