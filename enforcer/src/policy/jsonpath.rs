//! The JSONPath subset of body constraints: `$` followed by `.name`, `['name']` (or
//! `["name"]`), `[n]`, `[*]` and `.*`. No well-kept crate fits, so this is a small strict
//! parser; anything else (filters, slices, `..`, negative indices) is a load error.

use std::fmt;

/// Longest JSONPath accepted, in bytes.
const MAX_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Segment {
    Name(String),
    Index(usize),
    Wildcard,
}

/// A compiled JSONPath; displays as written.
#[derive(Debug, Clone)]
pub(crate) struct JsonPath {
    text: String,
    segments: Vec<Segment>,
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl JsonPath {
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The path of one top-level member, `name` as written in a query string or form body:
    /// what a `query:` constraint on parameter `name` selects in the parsed query.
    pub(crate) fn member(name: &str) -> JsonPath {
        JsonPath {
            text: name.to_owned(),
            segments: vec![Segment::Name(name.to_owned())],
        }
    }

    /// The member name of a path that is exactly one top-level member (`$.amount`,
    /// `$['amount']`): the query parameter of the same name is judged as that field.
    pub(crate) fn top_level_name(&self) -> Option<&str> {
        match self.segments.as_slice() {
            [Segment::Name(n)] => Some(n),
            _ => None,
        }
    }

    pub(crate) fn parse(text: &str) -> Result<JsonPath, String> {
        let err = |at: usize, what: &str| format!("JSONPath '{text}' at offset {at}: {what}");
        if text.len() > MAX_LEN {
            return Err(format!("JSONPath longer than {MAX_LEN} bytes"));
        }
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| err(0, "must start with '$'"))?;
        let bytes = rest.as_bytes();
        let mut segments = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let at = i + 1;
            match bytes[i] {
                b'.' => {
                    i += 1;
                    if bytes.get(i) == Some(&b'*') {
                        segments.push(Segment::Wildcard);
                        i += 1;
                        continue;
                    }
                    if bytes.get(i) == Some(&b'.') {
                        return Err(err(at, "recursive descent '..' is not supported"));
                    }
                    let start = i;
                    while i < bytes.len() && is_name_byte(bytes[i], i == start) {
                        i += 1;
                    }
                    if i == start {
                        return Err(err(
                            at,
                            "expected a name after '.' (use ['name'] for other characters)",
                        ));
                    }
                    segments.push(Segment::Name(rest[start..i].to_owned()));
                }
                b'[' => {
                    i += 1;
                    match bytes.get(i) {
                        Some(b'*') => {
                            i += 1;
                            segments.push(Segment::Wildcard);
                        }
                        Some(&q @ (b'\'' | b'"')) => {
                            i += 1;
                            let mut name = String::new();
                            loop {
                                let Some(c) = rest[i..].chars().next() else {
                                    return Err(err(at, "unterminated quoted name"));
                                };
                                i += c.len_utf8();
                                match c {
                                    '\\' => match rest[i..].chars().next() {
                                        Some(e @ ('\\' | '\'' | '"')) => {
                                            name.push(e);
                                            i += 1;
                                        }
                                        _ => {
                                            return Err(err(
                                                at,
                                                "only \\\\, \\' and \\\" escapes are supported",
                                            ));
                                        }
                                    },
                                    c if c == char::from(q) => break,
                                    c => name.push(c),
                                }
                            }
                            segments.push(Segment::Name(name));
                        }
                        Some(b'0'..=b'9') => {
                            let start = i;
                            while i < bytes.len() && bytes[i].is_ascii_digit() {
                                i += 1;
                            }
                            let digits = &rest[start..i];
                            if digits.len() > 1 && digits.starts_with('0') {
                                return Err(err(at, "index with a leading zero"));
                            }
                            let n = digits
                                .parse::<usize>()
                                .map_err(|_| err(at, "index too large"))?;
                            segments.push(Segment::Index(n));
                        }
                        _ => {
                            return Err(err(
                                at,
                                "expected *, a quoted name or a non-negative index after '['",
                            ));
                        }
                    }
                    if bytes.get(i) != Some(&b']') {
                        return Err(err(i + 1, "expected ']'"));
                    }
                    i += 1;
                }
                _ => return Err(err(at, "expected '.' or '['")),
            }
        }
        if segments.is_empty() {
            return Err(err(
                1,
                "select something inside the body, for example $.amount",
            ));
        }
        Ok(JsonPath {
            text: text.to_owned(),
            segments,
        })
    }
}

/// RFC 9535 member-name shorthand: a letter, `_` or non-ASCII, then also digits.
fn is_name_byte(b: u8, first: bool) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 || (!first && b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_subset() {
        for (text, want) in [
            ("$.amount", vec![Segment::Name("amount".into())]),
            (
                "$.a.b_2[0]",
                vec![
                    Segment::Name("a".into()),
                    Segment::Name("b_2".into()),
                    Segment::Index(0),
                ],
            ),
            (
                "$['metadata[order_id]']",
                vec![Segment::Name("metadata[order_id]".into())],
            ),
            (
                "$[\"a'b\"]['c\\'d']",
                vec![Segment::Name("a'b".into()), Segment::Name("c'd".into())],
            ),
            (
                "$.messages[*].role",
                vec![
                    Segment::Name("messages".into()),
                    Segment::Wildcard,
                    Segment::Name("role".into()),
                ],
            ),
            ("$.*", vec![Segment::Wildcard]),
        ] {
            assert_eq!(JsonPath::parse(text).unwrap().segments, want, "{text}");
        }
    }

    #[test]
    fn rejects_the_rest() {
        for text in [
            "",
            "$",
            "amount",
            "$.",
            "$..a",
            "$.a-b",
            "$[-1]",
            "$[01]",
            "$[1:2]",
            "$[?(@.a)]",
            "$['a'",
            "$['a\\x']",
            "$.a[",
            "$.1a",
            "$ .a",
        ] {
            assert!(JsonPath::parse(text).is_err(), "{text} should be refused");
        }
    }
}
