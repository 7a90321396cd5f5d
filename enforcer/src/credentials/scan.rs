//! Streaming search over bodies: replacing every occurrence of some byte strings (masking a
//! secret an upstream echoes) and finding any of them (a placeholder leaving where it must
//! not), chunk by chunk, with nothing buffered beyond a possible partial match at a chunk's
//! end.
//!
//! What is held back is only the longest tail of the data seen that is a proper prefix of a
//! pattern: a chunk that does not end in the first bytes of a secret goes out whole at once,
//! so server-sent events and chunked streams stay incremental.

use std::sync::Arc;

use aho_corasick::AhoCorasick;
use bytes::{Bytes, BytesMut};

use super::Secret;

/// Bytes to find or to put in: plain, or a secret read in place (never copied out of its
/// zeroizing box).
#[derive(Clone)]
pub enum Piece {
    Plain(Arc<[u8]>),
    Secret(Arc<Secret>),
}

impl Piece {
    pub fn plain(bytes: &[u8]) -> Piece {
        Piece::Plain(Arc::from(bytes))
    }

    fn bytes(&self) -> &[u8] {
        use secrecy::ExposeSecret as _;
        match self {
            Piece::Plain(b) => b,
            Piece::Secret(s) => s.expose_secret(),
        }
    }
}

/// The longest tail of `data` that is a proper prefix of one of `patterns`.
fn partial_tail<'a>(data: &[u8], patterns: impl Iterator<Item = &'a [u8]>) -> usize {
    let mut best = 0;
    for p in patterns {
        let most = (p.len() - 1).min(data.len());
        // From the longest candidate down; the first byte filters most of them out.
        for k in (best + 1..=most).rev() {
            let tail = &data[data.len() - k..];
            if tail[0] == p[0] && tail == &p[..k] {
                best = k;
                break;
            }
        }
    }
    best
}

/// Replaces each `from` with its `to` in a value or a stream of chunks. Matching is
/// `memmem` per pattern (a request or response carries one or two credentials), so building
/// one costs nothing and no searcher keeps a copy of a secret.
pub struct Replacer {
    pairs: Vec<(Piece, Piece)>,
    held: BytesMut,
}

impl Replacer {
    /// `None` when there is nothing (non-empty) to find.
    pub fn new(pairs: Vec<(Piece, Piece)>) -> Option<Self> {
        let pairs: Vec<_> = pairs
            .into_iter()
            .filter(|(f, _)| !f.bytes().is_empty())
            .collect();
        if pairs.is_empty() {
            return None;
        }
        Some(Self {
            pairs,
            held: BytesMut::new(),
        })
    }

    /// The first match at or after `at`: (start, pair index); the longest one on a tie.
    fn next_match(&self, data: &[u8], at: usize) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (i, (from, _)) in self.pairs.iter().enumerate() {
            let Some(pos) = memchr::memmem::find(&data[at..], from.bytes()) else {
                continue;
            };
            let start = at + pos;
            let better = match best {
                None => true,
                Some((s, j)) => {
                    start < s || (start == s && from.bytes().len() > self.pairs[j].0.bytes().len())
                }
            };
            if better {
                best = Some((start, i));
            }
        }
        best
    }

    /// Every match replaced, into `out`; the index where unmatched data begins.
    fn replace_into(&self, data: &[u8], out: &mut Vec<u8>) -> (bool, usize) {
        let mut at = 0;
        let mut any = false;
        while let Some((start, i)) = self.next_match(data, at) {
            any = true;
            out.extend_from_slice(&data[at..start]);
            out.extend_from_slice(self.pairs[i].1.bytes());
            at = start + self.pairs[i].0.bytes().len();
        }
        (any, at)
    }

    /// Replaces in one value as a whole (a header); `None` when nothing matched.
    pub fn replace_all(&self, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() + 64);
        let (any, at) = self.replace_into(data, &mut out);
        if !any {
            return None;
        }
        out.extend_from_slice(&data[at..]);
        Some(out)
    }

    /// The next chunk: what can go out now (possibly empty; the chunk itself, uncopied,
    /// when nothing in it needs a change).
    pub fn push(&mut self, chunk: &Bytes) -> Bytes {
        let joined;
        let data: &[u8] = if self.held.is_empty() {
            chunk
        } else {
            let mut j = std::mem::take(&mut self.held);
            j.extend_from_slice(chunk);
            joined = j;
            &joined
        };
        let mut out = Vec::with_capacity(data.len());
        let (any, at) = self.replace_into(data, &mut out);
        let rest = &data[at..];
        let keep = partial_tail(rest, self.pairs.iter().map(|(f, _)| f.bytes()));
        self.held = BytesMut::from(&rest[rest.len() - keep..]);
        if !any && out.is_empty() && keep == 0 && data.len() == chunk.len() {
            // Nothing found, nothing held: the chunk goes out as it came.
            return chunk.clone();
        }
        out.extend_from_slice(&rest[..rest.len() - keep]);
        Bytes::from(out)
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }

    /// Bytes held back, waiting for the next chunk.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }
}

/// Patterns to find in streams, built once and shared by every [`Finder`].
pub struct Patterns {
    finder: AhoCorasick,
    patterns: Vec<Vec<u8>>,
    longest: usize,
}

impl Patterns {
    /// `None` when there is nothing to find.
    pub fn new(patterns: Vec<Vec<u8>>) -> Option<Self> {
        if patterns.is_empty() || patterns.iter().any(Vec::is_empty) {
            return None;
        }
        let finder = AhoCorasick::new(&patterns).ok()?;
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(1);
        Some(Self {
            finder,
            patterns,
            longest,
        })
    }
}

/// Finds patterns in a stream of chunks, across chunk boundaries.
pub struct Finder {
    patterns: Arc<Patterns>,
    /// The tail of the data seen so far that could start a match.
    tail: Vec<u8>,
}

impl Finder {
    pub fn new(patterns: Arc<Patterns>) -> Self {
        Self {
            patterns,
            tail: Vec::new(),
        }
    }

    /// The patterns found in this chunk, with the end of the previous one (each once).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<usize> {
        let p = &*self.patterns;
        let mut found: Vec<usize> = Vec::new();
        let mut add = |i: usize| {
            if !found.contains(&i) {
                found.push(i);
            }
        };
        if !self.tail.is_empty() {
            // Only the boundary needs joining: the tail and the start of the chunk.
            let head = &chunk[..chunk.len().min(p.longest)];
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(head);
            for m in p.finder.find_overlapping_iter(&joined[..]) {
                add(m.pattern().as_usize());
            }
        }
        for m in p.finder.find_overlapping_iter(chunk) {
            add(m.pattern().as_usize());
        }
        let keep = partial_tail(chunk, p.patterns.iter().map(Vec::as_slice));
        self.tail.clear();
        self.tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replace_in_chunks(r: &mut Replacer, chunks: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        for c in chunks {
            let b = r.push(&Bytes::copy_from_slice(c));
            sizes.push(b.len());
            out.extend_from_slice(&b);
        }
        out.extend_from_slice(&r.finish());
        (out, sizes)
    }

    #[test]
    fn replaces_across_every_split_of_the_input() {
        let text = b"data: the key is s3cr3t-value, again s3cr3t-value!\n\n";
        let want = b"data: the key is PH, again PH!\n\n";
        for split in 0..=text.len() {
            for split2 in split..=text.len() {
                let mut r =
                    Replacer::new(vec![(Piece::plain(b"s3cr3t-value"), Piece::plain(b"PH"))])
                        .unwrap();
                let (out, _) = replace_in_chunks(
                    &mut r,
                    &[&text[..split], &text[split..split2], &text[split2..]],
                );
                assert_eq!(out, want, "split at {split}/{split2}");
            }
        }
    }

    #[test]
    fn holds_back_only_a_partial_match() {
        let mut r = Replacer::new(vec![(Piece::plain(b"secret"), Piece::plain(b"x"))]).unwrap();
        // An event that ends cleanly goes out at once, whole.
        let (_, sizes) = replace_in_chunks(&mut r, &[b"data: 1\n\n", b"data: 2\n\n"]);
        assert_eq!(sizes, vec![9, 9]);
        let mut r = Replacer::new(vec![(Piece::plain(b"secret"), Piece::plain(b"x"))]).unwrap();
        assert_eq!(&r.push(&Bytes::from_static(b"abc sec"))[..], b"abc ");
        assert!(r.holding());
        assert_eq!(&r.push(&Bytes::from_static(b"ond"))[..], b"second");
        assert!(!r.holding());
    }

    #[test]
    fn finds_a_pattern_split_over_chunks() {
        let p = b"ph_0123456789abcdef".to_vec();
        let body = b"{\"text\": \"here ph_0123456789abcdef there\"}";
        let both = Arc::new(Patterns::new(vec![b"other".to_vec(), p.clone()]).unwrap());
        for split in 0..=body.len() {
            let mut f = Finder::new(both.clone());
            let mut found = f.push(&body[..split]);
            found.extend(f.push(&body[split..]));
            assert_eq!(found, vec![1], "split at {split}");
        }
        let mut f = Finder::new(Arc::new(Patterns::new(vec![p]).unwrap()));
        assert!(f.push(b"nothing here").is_empty());
        assert!(f.push(b"ph_01234 or later").is_empty());
    }

    #[test]
    fn whole_values_are_replaced_in_one_go() {
        let r = Replacer::new(vec![(Piece::plain(b"REAL"), Piece::plain(b"ph"))]).unwrap();
        assert_eq!(r.replace_all(b"Bearer REAL").unwrap(), b"Bearer ph");
        assert!(r.replace_all(b"Bearer other").is_none());
    }
}
