//! Everything one client connection owns, so that the kill switch cuts all of it at once: the
//! tasks spawned on its behalf (HTTP/2 streams, upstream connection drivers, upgraded
//! tunnels) and its sockets (the client's and every upstream's). Once the scope is killed, a
//! socket closes with a reset instead of a FIN.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    task::AbortHandle,
};

/// The tasks and sockets of one client connection.
#[derive(Default)]
pub struct Scope {
    killed: AtomicBool,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// Finished tasks are pruned from the list once it grows past this.
const PRUNE_AT: usize = 64;

impl Scope {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Spawns a task that lives at most as long as the scope.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(fut).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.len() >= PRUNE_AT {
            tasks.retain(|t| !t.is_finished());
        }
        tasks.push(handle);
    }

    /// Cuts the connection: every socket of the scope closes with a reset when dropped, and
    /// every task is aborted (which drops its sockets).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.abort_all();
    }

    /// Aborts every task still running (the connection is over).
    pub fn abort_all(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            t.abort();
        }
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// Completes once the kill switch engaged, after killing `scope`: a future selected against
/// this one is dropped only after its sockets know to reset. Never completes if the signal
/// goes away (the connection was unregistered).
pub async fn killed(signal: &mut tokio::sync::watch::Receiver<bool>, scope: &Scope) {
    if signal.wait_for(|k| *k).await.is_err() {
        std::future::pending::<()>().await;
    }
    scope.kill();
}

/// A hyper executor that spawns into a [`Scope`].
#[derive(Clone)]
pub struct ScopeExec(pub Arc<Scope>);

impl<F> hyper::rt::Executor<F> for ScopeExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(async move {
            let _ = fut.await;
        });
    }
}

/// A TCP stream that belongs to a scope: dropped after the scope was killed, it resets the
/// connection.
pub struct Tracked {
    inner: TcpStream,
    scope: Arc<Scope>,
}

impl Tracked {
    pub fn new(inner: TcpStream, scope: Arc<Scope>) -> Self {
        Self { inner, scope }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.scope.is_killed() {
            crate::sys::reset_on_close(&self.inner);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    forward_async_write!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[tokio::test]
    async fn a_killed_scope_resets_its_sockets_and_aborts_its_tasks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let scope = Scope::new();
        let tracked = Tracked::new(server, scope.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        scope.spawn(async move {
            let _keep = tracked;
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        scope.kill();
        // The task is gone (its sender dropped) and the socket was reset, not closed.
        assert!(rx.await.is_err());
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
