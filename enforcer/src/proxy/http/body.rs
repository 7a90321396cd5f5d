//! Bodies on both sides of the proxy: the request body sent upstream (streamed, or replayed
//! from what was buffered for inspection, then streamed), and the response body sent to the
//! agent (streamed frame by frame, counted, with the `completion` record written when it ends
//! or is dropped).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::{
    agents::Caller,
    audit::{AuditLog, EventKind},
    credentials::{BodyWatch, Refusal, scan::Replacer},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a watched request body leaves the refusal that cut it short.
pub type LeakSlot = Arc<std::sync::Mutex<Option<Refusal>>>;

/// The refusal a watched body left, if any.
pub fn take_leak(slot: &LeakSlot) -> Option<Refusal> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The error a watched body ends with when it meets a placeholder that may not go.
#[derive(Debug, thiserror::Error)]
#[error("the request body carries a credential placeholder that may not be sent here")]
pub struct LeakInBody;

/// A request body on its way upstream; counts the bytes it yields.
pub struct UpBody {
    /// Buffered for inspection, replayed first.
    buffered: VecDeque<Bytes>,
    /// Trailers read while buffering a complete body.
    trailers: Option<HeaderMap>,
    /// What was not buffered.
    rest: Option<Incoming>,
    sent: Arc<AtomicU64>,
    /// Placeholders that may not go with this body, and where to say so.
    watch: Option<(Box<BodyWatch>, LeakSlot)>,
}

impl UpBody {
    /// Watches what streams from now on for placeholders: the first one that may not go
    /// ends the body with an error (the upstream never gets a whole request), and the
    /// refusal is left in the slot.
    pub fn watched(mut self, watch: BodyWatch) -> (Self, Option<LeakSlot>) {
        let slot = LeakSlot::default();
        self.watch = Some((Box::new(watch), slot.clone()));
        (self, Some(slot))
    }

    pub fn streamed(body: Incoming, sent: Arc<AtomicU64>) -> Self {
        Self {
            buffered: VecDeque::new(),
            trailers: None,
            rest: Some(body),
            sent,
            watch: None,
        }
    }

    pub fn empty(sent: Arc<AtomicU64>) -> Self {
        Self {
            buffered: VecDeque::new(),
            trailers: None,
            rest: None,
            sent,
            watch: None,
        }
    }

    pub fn replay(buffered: Buffered, sent: Arc<AtomicU64>) -> Self {
        Self {
            buffered: buffered.chunks.into(),
            trailers: buffered.trailers,
            rest: buffered.rest,
            sent,
            watch: None,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.buffered.pop_front() {
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(rest).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    if let Some((watch, slot)) = self.watch.as_mut()
                        && let Some(refusal) = watch.push(d)
                    {
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(refusal);
                        self.rest = None;
                        return Poll::Ready(Some(Err(Box::new(LeakInBody))));
                    }
                    self.sent.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            None => self.rest = None,
            Some(Err(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.buffered.iter().map(|c| c.len() as u64).sum();
        let mut hint = self.rest.as_ref().map(Body::size_hint).unwrap_or_else(|| {
            let mut h = SizeHint::new();
            h.set_exact(0);
            h
        });
        // Upper first: a lower bound above the upper one panics.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + buffered);
        }
        hint.set_lower(hint.lower() + buffered);
        hint
    }
}

/// A request body read for inspection.
pub struct Buffered {
    pub chunks: Vec<Bytes>,
    /// The body went past the limit; `rest` holds what follows.
    pub truncated: bool,
    pub trailers: Option<HeaderMap>,
    pub rest: Option<Incoming>,
}

impl Buffered {
    /// No body.
    pub fn empty() -> Buffered {
        Buffered {
            chunks: Vec::new(),
            truncated: false,
            trailers: None,
            rest: None,
        }
    }

    /// The buffered bytes in one piece (at most `limit` plus one frame).
    pub fn joined(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }
}

/// Reads `body` until its end or until more than `limit` bytes have come.
pub async fn buffer(mut body: Incoming, limit: usize) -> Result<Buffered, hyper::Error> {
    use http_body_util::BodyExt as _;
    let mut out = Buffered {
        chunks: Vec::new(),
        truncated: false,
        trailers: None,
        rest: None,
    };
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                total += data.len();
                out.chunks.push(data);
                if total > limit {
                    out.truncated = true;
                    out.rest = Some(body);
                    return Ok(out);
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    out.trailers = Some(t);
                }
            }
        }
    }
    Ok(out)
}

/// What a `completion` record says about one forwarded request.
pub struct Completion {
    pub audit: AuditLog,
    pub request_id: String,
    pub caller: Caller,
    pub host: String,
    pub dest: String,
    pub method: String,
    pub path: String,
    pub rule: Option<Arc<str>>,
    pub started: Instant,
    pub status: u16,
    pub bytes_up: Arc<AtomicU64>,
    pub reason: Option<String>,
}

impl Completion {
    /// Writes the record, with `bytes_down` sent to the agent.
    pub fn record(self, bytes_down: u64) {
        let mut ev = self
            .caller
            .event(EventKind::Completion)
            .request_id(self.request_id)
            .url_host(self.host)
            .dest(self.dest)
            .method(self.method)
            .url_path(self.path)
            .status_code(self.status)
            .latency_ms(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
            .bytes_up(self.bytes_up.load(Ordering::Relaxed))
            .bytes_down(bytes_down);
        if let Some(rule) = self.rule {
            ev = ev.matched_rule(rule.to_string());
        }
        if let Some(reason) = self.reason {
            ev = ev.reason(reason);
        }
        // Completions are not decisions: a failing log does not stop a response.
        let _ = self.audit.record(ev);
    }
}

/// A response body for the agent.
pub enum DownBody {
    /// Written by the proxy (denials, errors).
    Local(Option<Bytes>),
    /// Streamed from the upstream, frame by frame as it comes.
    Upstream {
        inner: Incoming,
        sent: u64,
        completion: Option<Box<Completion>>,
        /// Secrets back to placeholders, when the request was sent with any.
        mask: Option<Box<Masking>>,
    },
}

/// A response body being masked.
pub struct Masking {
    replacer: Replacer,
    /// A frame to give after the held-back bytes (trailers, or the end).
    after: Option<Option<Frame<Bytes>>>,
}

impl DownBody {
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        DownBody::Local(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        DownBody::Local(None)
    }

    pub fn upstream(inner: Incoming, completion: Completion) -> Self {
        DownBody::Upstream {
            inner,
            sent: 0,
            completion: Some(Box::new(completion)),
            mask: None,
        }
    }

    /// Masks the secrets `replacer` knows as it streams.
    pub fn masked(mut self, replacer: Replacer) -> Self {
        if let DownBody::Upstream { mask, .. } = &mut self {
            *mask = Some(Box::new(Masking {
                replacer,
                after: None,
            }));
        }
        self
    }

    fn finish(&mut self) {
        if let DownBody::Upstream {
            sent, completion, ..
        } = self
            && let Some(c) = completion.take()
        {
            c.record(*sent);
        }
    }
}

impl Drop for DownBody {
    fn drop(&mut self) {
        // Ended early (the agent went away, or a HEAD response): still one completion.
        self.finish();
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match this {
            DownBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            DownBody::Upstream {
                inner, sent, mask, ..
            } => {
                if let Some(m) = mask.as_mut()
                    && let Some(after) = m.after.take()
                {
                    return match after {
                        Some(f) => Poll::Ready(Some(Ok(f))),
                        None => {
                            this.finish();
                            Poll::Ready(None)
                        }
                    };
                }
                let frame = loop {
                    let frame = std::task::ready!(Pin::new(&mut *inner).poll_frame(cx));
                    let Some(m) = mask.as_mut() else {
                        break frame;
                    };
                    match frame {
                        Some(Ok(f)) => match f.into_data() {
                            Ok(d) => {
                                let out = m.replacer.push(&d);
                                // All held back (a possible start of a secret): read on.
                                if !out.is_empty() {
                                    break Some(Ok(Frame::data(out)));
                                }
                            }
                            Err(other) => {
                                let held = m.replacer.finish();
                                if held.is_empty() {
                                    break Some(Ok(other));
                                }
                                m.after = Some(Some(other));
                                break Some(Ok(Frame::data(held)));
                            }
                        },
                        None => {
                            let held = m.replacer.finish();
                            if held.is_empty() {
                                break None;
                            }
                            m.after = Some(None);
                            break Some(Ok(Frame::data(held)));
                        }
                        Some(Err(e)) => break Some(Err(e)),
                    }
                };
                match frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            *sent += d.len() as u64;
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Some(Err(e)) => {
                        this.finish();
                        Poll::Ready(Some(Err(e.into())))
                    }
                    None => {
                        this.finish();
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownBody::Local(b) => b.is_none(),
            DownBody::Upstream { inner, mask, .. } => {
                inner.is_end_stream()
                    && mask
                        .as_ref()
                        .is_none_or(|m| m.after.is_none() && !m.replacer.holding())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            // Masking changes the length.
            DownBody::Upstream { mask: Some(_), .. } => SizeHint::default(),
            DownBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
