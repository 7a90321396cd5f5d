//! HTTP/1 framing checks in front of hyper.
//!
//! hyper is lenient where a proxy must not be: it accepts a bare LF as a line ending, drops
//! `Content-Length` when `Transfer-Encoding` is present, and takes repeated equal
//! `Content-Length`s. Two parsers that disagree on where a request ends are how requests are
//! smuggled, so [`Guard`] sits between the client socket and hyper and refuses those heads
//! before hyper sees a byte of them.
//!
//! The guard holds every request head back until it is complete, checks it (bare LF,
//! obs-fold, both `Content-Length` and `Transfer-Encoding`, a repeated or invalid
//! `Content-Length`, a `Transfer-Encoding` other than `chunked`, more than
//! [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`]), and only then releases it. It follows the framing
//! of each body (a length, or chunks whose size lines are parsed by httparse) to know where
//! the next head starts; after a request that may switch protocols (`CONNECT`, `Upgrade`) it
//! stops looking. A head that does not arrive within [`HEAD_TIMEOUT`] of its first byte is
//! refused too.
//!
//! On a refusal, hyper is shown the end of the stream right before the bad head, so it
//! finishes the responses in flight and closes; the guard then writes the refusal (a JSON
//! 400, 431 or 408 rendered by the [`Reporter`]) in place of the close.

use std::{
    collections::VecDeque,
    future::Future as _,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest request head (request line and header fields), and largest trailer section.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request head (hyper's own default).
pub const MAX_HEADERS: usize = 100;
/// Longest time from the first byte of a request head to its end.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest chunk-size line (the size and its extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Bytes read from the client at a time.
const READ_SIZE: usize = 16 * 1024;

/// Why a request was refused before reaching hyper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// 400: a malformed or ambiguous request.
    BadRequest(String),
    /// 431: the head is too large.
    TooLarge(String),
    /// 408: the head did not arrive in time.
    Timeout,
}

impl Violation {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Violation::BadRequest(_) => http::StatusCode::BAD_REQUEST,
            Violation::TooLarge(_) => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Violation::Timeout => http::StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Violation::BadRequest(why) => format!("malformed request: {why}"),
            Violation::TooLarge(why) => format!("request head too large: {why}"),
            Violation::Timeout => format!(
                "request head not received within {}s",
                HEAD_TIMEOUT.as_secs()
            ),
        }
    }
}

/// Renders (and records) the response to a refused request: the complete bytes of an
/// HTTP/1.1 response that closes the connection.
pub type Reporter = Box<dyn FnOnce(&Violation) -> Vec<u8> + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// This many body bytes to go.
    Body(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// This many chunk bytes to go.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk.
    ChunkEnd,
    /// Expecting the trailer section after the last chunk.
    Trailers,
    /// After a request that may switch protocols: bytes pass unchecked.
    Opaque,
}

enum Answer {
    /// No refusal to write (yet).
    None,
    /// Writing these bytes at shutdown.
    Writing(Bytes),
    Done,
}

/// See the module docs.
pub struct Guard<T> {
    inner: T,
    /// Read from the client, not yet checked.
    raw: BytesMut,
    /// Checked, for hyper, in the order read.
    ready: VecDeque<Bytes>,
    /// Where reads from the client land (allocated and zeroed once).
    buf: Box<[u8]>,
    state: State,
    /// How far the current head has been scanned for bare LF and obs-fold.
    scanned: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    head_timeout: Duration,
    violation: Option<Violation>,
    reporter: Option<Reporter>,
    answer: Answer,
    eof: bool,
}

impl<T> Guard<T> {
    pub fn new(inner: T, reporter: Reporter) -> Self {
        Self::with_timeout(inner, reporter, HEAD_TIMEOUT)
    }

    pub fn with_timeout(inner: T, reporter: Reporter, head_timeout: Duration) -> Self {
        Self {
            inner,
            raw: BytesMut::new(),
            ready: VecDeque::new(),
            buf: vec![0; READ_SIZE].into_boxed_slice(),
            state: State::Head,
            scanned: 0,
            deadline: None,
            head_timeout,
            violation: None,
            reporter: Some(reporter),
            answer: Answer::None,
            eof: false,
        }
    }

    fn fail(&mut self, v: Violation) {
        tracing::debug!("refusing an HTTP/1 request: {}", v.reason());
        self.violation = Some(v);
        self.raw.clear();
        self.deadline = None;
    }

    /// Moves checked bytes from `raw` to `ready`, as far as the framing allows.
    fn process(&mut self) {
        while !self.raw.is_empty() && self.violation.is_none() {
            match self.state {
                State::Head => {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    if self.scanned == 0 && self.raw.starts_with(b"\r\n") {
                        self.take(2);
                        continue;
                    }
                    match scan_section(&self.raw, &mut self.scanned) {
                        Err(v) => self.fail(v),
                        Ok(None) => {
                            if self.raw.len() > MAX_HEAD_BYTES {
                                self.fail(Violation::TooLarge(format!(
                                    "over {} KiB",
                                    MAX_HEAD_BYTES >> 10
                                )));
                            }
                            return;
                        }
                        Ok(Some(len)) => {
                            if len > MAX_HEAD_BYTES {
                                self.fail(Violation::TooLarge(format!(
                                    "over {} KiB",
                                    MAX_HEAD_BYTES >> 10
                                )));
                                return;
                            }
                            match judge_head(&self.raw[..len]) {
                                Err(v) => self.fail(v),
                                Ok(next) => {
                                    self.take(len as u64);
                                    self.state = next;
                                    self.scanned = 0;
                                    self.deadline = None;
                                }
                            }
                        }
                    }
                }
                State::Body(left) => {
                    let n = self.take(left);
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = self.take(left);
                    self.state = if n == left {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd => {
                    if self.raw.len() < 2 {
                        return;
                    }
                    if &self.raw[..2] != b"\r\n" {
                        self.fail(Violation::BadRequest("chunk not followed by CRLF".into()));
                        return;
                    }
                    self.take(2);
                    self.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let Some(lf) = self.raw.iter().position(|b| *b == b'\n') else {
                        if self.raw.len() > MAX_CHUNK_LINE {
                            self.fail(Violation::BadRequest("chunk-size line too long".into()));
                        }
                        return;
                    };
                    if lf == 0 || self.raw[lf - 1] != b'\r' || lf > MAX_CHUNK_LINE {
                        self.fail(Violation::BadRequest("bad chunk-size line".into()));
                        return;
                    }
                    match httparse::parse_chunk_size(&self.raw[..=lf]) {
                        Ok(httparse::Status::Complete((used, size))) if used == lf + 1 => {
                            self.take(used as u64);
                            self.state = if size == 0 {
                                State::Trailers
                            } else {
                                State::ChunkData(size)
                            };
                        }
                        _ => {
                            self.fail(Violation::BadRequest("invalid chunk size".into()));
                            return;
                        }
                    }
                }
                State::Trailers => {
                    if self.scanned == 0 && self.raw.starts_with(b"\r\n") {
                        self.take(2);
                        self.state = State::Head;
                        continue;
                    }
                    match scan_section(&self.raw, &mut self.scanned) {
                        Err(v) => self.fail(v),
                        Ok(None) => {
                            if self.raw.len() > MAX_HEAD_BYTES {
                                self.fail(Violation::TooLarge("trailers over 64 KiB".into()));
                            }
                            return;
                        }
                        Ok(Some(len)) => {
                            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                            match httparse::parse_headers(&self.raw[..len], &mut fields) {
                                Ok(httparse::Status::Complete((used, _))) if used == len => {
                                    self.take(len as u64);
                                    self.scanned = 0;
                                    self.state = State::Head;
                                }
                                _ => {
                                    self.fail(Violation::BadRequest("malformed trailers".into()));
                                    return;
                                }
                            }
                        }
                    }
                }
                State::Opaque => {
                    let all = self.raw.split().freeze();
                    self.ready.push_back(all);
                }
            }
        }
    }

    /// Moves up to `max` bytes from `raw` to `ready`; returns how many.
    fn take(&mut self, max: u64) -> u64 {
        let n = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(self.raw.len());
        let part = self.raw.split_to(n).freeze();
        self.ready.push_back(part);
        n as u64
    }

    /// A head has started: the clock runs until it is complete.
    fn head_in_progress(&self) -> bool {
        matches!(self.state, State::Head | State::Trailers) && !self.raw.is_empty()
    }
}

/// Scans a header section (a request head or trailers) from `*scanned` on. `Ok(Some(len))`
/// when it is complete (ends with an empty line) and clean, `Ok(None)` when more is needed.
fn scan_section(buf: &[u8], scanned: &mut usize) -> Result<Option<usize>, Violation> {
    let mut i = *scanned;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err(Violation::BadRequest(
                    "bare LF line ending (lines must end with CRLF)".into(),
                ));
            }
            match buf.get(i + 1) {
                // Need the next byte to know what follows the line.
                None => break,
                Some(b' ' | b'\t') => {
                    return Err(Violation::BadRequest(
                        "obs-fold (a header line starting with whitespace)".into(),
                    ));
                }
                Some(b'\r') => match buf.get(i + 2) {
                    None => break,
                    Some(b'\n') => return Ok(Some(i + 3)),
                    Some(_) => {
                        return Err(Violation::BadRequest("bare CR in the head".into()));
                    }
                },
                Some(_) => {}
            }
        } else if buf[i] == b'\r' && buf.get(i + 1).is_some_and(|b| *b != b'\n') {
            return Err(Violation::BadRequest("bare CR in the head".into()));
        }
        i += 1;
    }
    // Resume at the last incomplete line ending next time.
    *scanned = i.saturating_sub(2);
    Ok(None)
}

/// Checks a complete request head; returns the framing of what follows it.
fn judge_head(head: &[u8]) -> Result<State, Violation> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Violation::BadRequest("incomplete request head".into()));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Violation::TooLarge(format!(
                "more than {MAX_HEADERS} header fields"
            )));
        }
        Err(e) => return Err(Violation::BadRequest(format!("{e}"))),
    }
    let mut content_length: Vec<&[u8]> = Vec::new();
    let mut transfer_encoding: Vec<&[u8]> = Vec::new();
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding.push(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if !content_length.is_empty() && !transfer_encoding.is_empty() {
        return Err(Violation::BadRequest(
            "both Content-Length and Transfer-Encoding".into(),
        ));
    }
    if content_length.len() > 1 {
        return Err(Violation::BadRequest("more than one Content-Length".into()));
    }
    let length = match content_length.first() {
        None => 0,
        Some(v) => {
            let v = trim_ows(v);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(Violation::BadRequest("invalid Content-Length".into()));
            }
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Violation::BadRequest("invalid Content-Length".into()))?
        }
    };
    let chunked = match transfer_encoding.as_slice() {
        [] => false,
        _ if req.version == Some(0) => {
            return Err(Violation::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request".into(),
            ));
        }
        [one] if trim_ows(one).eq_ignore_ascii_case(b"chunked") => true,
        _ => {
            return Err(Violation::BadRequest(
                "unsupported Transfer-Encoding (only a single 'chunked' is accepted)".into(),
            ));
        }
    };
    let connect = req
        .method
        .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
    Ok(if connect || upgrade {
        State::Opaque
    } else if chunked {
        State::ChunkSize
    } else if length > 0 {
        State::Body(length)
    } else {
        State::Head
    })
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

impl<T: AsyncRead + Unpin> AsyncRead for Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(front) = this.ready.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    this.ready.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            // A refusal or the client's end: hyper sees the end of the stream, at a message
            // boundary.
            if this.violation.is_some() || this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.head_in_progress() {
                let timeout = this.head_timeout;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_ready() {
                    this.fail(Violation::Timeout);
                    continue;
                }
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            this.raw.extend_from_slice(&this.buf[..n]);
            this.process();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Writes the refusal, if any, before closing.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let (Answer::None, Some(v)) = (&this.answer, &this.violation) {
            let bytes = this.reporter.take().map(|r| r(v)).unwrap_or_default();
            this.answer = Answer::Writing(Bytes::from(bytes));
        }
        while let Answer::Writing(bytes) = &mut this.answer {
            if bytes.is_empty() {
                this.answer = Answer::Done;
                break;
            }
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, bytes))?;
            if n == 0 {
                this.answer = Answer::Done;
                break;
            }
            bytes.advance(n);
        }
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` through a guard in pieces of `step` bytes; returns what hyper would see
    /// and the violation, if any.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Option<Violation>) {
        let mut g = Guard::new((), Box::new(|_| Vec::new()));
        for piece in input.chunks(step) {
            g.raw.extend_from_slice(piece);
            g.process();
        }
        (
            g.ready.iter().flat_map(|b| b.to_vec()).collect(),
            g.violation,
        )
    }

    fn bad(input: &str) -> Violation {
        for step in [1, 7, input.len()] {
            let (_, v) = run(input.as_bytes(), step);
            assert!(v.is_some(), "accepted with step {step}: {input:?}");
        }
        run(input.as_bytes(), input.len()).1.unwrap()
    }

    #[test]
    fn clean_requests_pass_whole_in_any_pieces() {
        let input = "GET / HTTP/1.1\r\nHost: a\r\n\r\n\
                     POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
                     POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n\
                     GET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 2, 3, 5, 64, input.len()] {
            let (out, v) = run(input.as_bytes(), step);
            assert_eq!(v, None, "step {step}");
            assert_eq!(out, input.as_bytes(), "step {step}");
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        ];
        for case in cases {
            assert!(matches!(bad(case), Violation::BadRequest(_)), "{case:?}");
        }
    }

    #[test]
    fn a_bad_second_request_is_cut_off_after_the_first() {
        let good = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let input = format!("{good}GET / HTTP/1.1\nHost: a\r\n\r\n");
        let (out, v) = run(input.as_bytes(), input.len());
        assert_eq!(out, good.as_bytes());
        assert!(v.is_some());
    }

    #[test]
    fn chunk_framing_is_followed_and_checked() {
        let body_with_fake_head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
             1b\r\nGET /x HTTP/1.1\nHost: b\r\n\r\n\r\n0\r\n\r\n";
        // The bare LF is inside a chunk: data, not a head.
        let (out, v) = run(body_with_fake_head.as_bytes(), 3);
        assert_eq!(v, None);
        assert_eq!(out.len(), body_with_fake_head.len());
        bad(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        );
        bad("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        bad("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiX\r\n");
    }

    #[test]
    fn oversized_heads_and_too_many_fields_are_431() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(matches!(bad(&big), Violation::TooLarge(_)));
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(bad(&many), Violation::TooLarge(_)));
    }

    #[test]
    fn after_an_upgrade_request_bytes_pass_unchecked() {
        let input = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\
                     \x01\x05\nhello\n\n";
        let (out, v) = run(input.as_bytes(), 4);
        assert_eq!(v, None);
        assert_eq!(out, input.as_bytes());
    }

    #[tokio::test]
    async fn a_refusal_is_written_at_shutdown_after_what_hyper_was_given() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut g = Guard::new(
            server,
            Box::new(|v| format!("HTTP/1.1 {} X\r\n\r\n", v.status().as_u16()).into_bytes()),
        );
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx")
            .await
            .unwrap();
        let mut seen = Vec::new();
        g.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        g.shutdown().await.unwrap();
        let mut answer = String::new();
        cr.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "HTTP/1.1 400 X\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_times_out_but_an_idle_connection_does_not() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut g = Guard::new(server, Box::new(|_| Vec::new()));
        let (_cr, mut cw) = tokio::io::split(client);
        let mut buf = [0u8; 64];
        // Idle: nothing read, no refusal, however long.
        let idle = tokio::time::timeout(HEAD_TIMEOUT * 3, g.read(&mut buf)).await;
        assert!(idle.is_err());
        assert_eq!(g.violation, None);
        cw.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(n, 0, "end of stream after the timeout");
        assert_eq!(g.violation, Some(Violation::Timeout));
    }
}
