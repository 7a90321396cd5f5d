//! Request path normalisation, and the same normalisation for the path part of patterns.
//!
//! Requests are matched on their normalised path: the query is dropped, `%XX` of unreserved
//! characters decoded, other escapes upper-cased, characters outside RFC 3986 `pchar`
//! percent-encoded, `//` collapsed and dot segments removed. What servers read differently
//! (an encoded `/`, `\` or NUL, a raw `\` or `#`, a malformed escape, control characters) is
//! refused as ambiguous, so a deny rule cannot be dodged by spelling.

use std::{borrow::Cow, sync::LazyLock};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// Characters percent-encoded by normalisation: everything but RFC 3986 `pchar`s and `/`.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@')
    .remove(b'/');

/// Glob syntax kept as is in patterns (besides `*`, already a `pchar`).
const GLOB_META: &[u8] = b"[]{}";

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` (unreserved, sub-delims, `:`, `@`) or `/`: the bytes [`ENCODE`] keeps.
fn is_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

/// Normalises a raw request target (origin form). Borrows when nothing changes.
pub(crate) fn normalize_target(target: &str) -> Result<Cow<'_, str>, String> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if !path.starts_with('/') {
        return Err("request target is not an absolute path".to_owned());
    }
    let bytes = path.as_bytes();
    let simple = bytes.iter().all(|&b| is_pchar(b)) && !path.contains("//") && !path.contains("/.");
    if simple {
        return Ok(Cow::Borrowed(path));
    }
    normalize(path, false).map(Cow::Owned)
}

/// Normalises the path of a URL pattern the way request paths are, keeping glob syntax, and
/// refuses what no normalised request path can hold.
pub(crate) fn normalize_pattern(path: &str) -> Result<String, String> {
    for (bad, what) in [
        ('?', "'?' (the query string is never matched; use '*')"),
        ('#', "'#'"),
        ('\\', "'\\' (use [*] to match a literal '*')"),
    ] {
        if path.contains(bad) {
            return Err(format!("path pattern '{path}' holds {what}"));
        }
    }
    if path.contains("//") {
        return Err(format!(
            "path pattern '{path}' holds '//', which normalised request paths never do"
        ));
    }
    let normalized = normalize(path, true).map_err(|e| format!("path pattern '{path}': {e}"))?;
    if normalized.split('/').any(|s| s == "." || s == "..") {
        return Err(format!(
            "path pattern '{path}' holds a '.' or '..' segment, which normalised request paths never do"
        ));
    }
    Ok(normalized)
}

fn normalize(path: &str, pattern: bool) -> Result<String, String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
                let byte = match hex {
                    [h, l] if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                        percent_encoding::percent_decode(&bytes[i..i + 3])
                            .next()
                            .unwrap_or(0)
                    }
                    _ => return Err("malformed percent-encoding".to_owned()),
                };
                match byte {
                    b'/' => return Err("encoded '/' (%2F)".to_owned()),
                    b'\\' => return Err("encoded '\\' (%5C)".to_owned()),
                    0 => return Err("encoded NUL (%00)".to_owned()),
                    b if is_unreserved(b) => out.push(char::from(b)),
                    b => out.push_str(percent_encoding::percent_encode_byte(b)),
                }
                i += 3;
                continue;
            }
            b'\\' => return Err("raw '\\'".to_owned()),
            b'#' => return Err("raw '#'".to_owned()),
            b if b.is_ascii_control() || b == b' ' => {
                return Err("control character or space".to_owned());
            }
            b if is_pchar(b) || (pattern && GLOB_META.contains(&b)) => out.push(char::from(b)),
            _ => {
                // Percent-encode one whole character (non-ASCII ones are several bytes).
                let len = path[i..].chars().next().map_or(1, char::len_utf8);
                out.extend(percent_encoding::utf8_percent_encode(
                    &path[i..i + len],
                    ENCODE,
                ));
                i += len;
                continue;
            }
        }
        i += 1;
    }
    if pattern {
        return Ok(out);
    }
    // Collapse "//" before removing dot segments, as nginx and Go's path.Clean do.
    while out.contains("//") {
        out = out.replace("//", "/");
    }
    if out.contains("/.") {
        out = remove_dot_segments(&out);
    }
    Ok(out)
}

/// RFC 3986 dot-segment removal, done by the `url` crate's path parser. By now the path holds
/// only `pchar`s, `/` and upper-case escapes, none of which that parser changes.
fn remove_dot_segments(path: &str) -> String {
    static BASE: LazyLock<Option<url::Url>> =
        LazyLock::new(|| url::Url::parse("http://normalise.invalid/").ok());
    match BASE.as_ref() {
        Some(base) => {
            let mut url = base.clone();
            url.set_path(path);
            url.path().to_owned()
        }
        // Unreachable (a constant URL); keeping the path unchanged would be the safe side
        // for deny rules only, so refuse every dot instead.
        None => "/..".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths() {
        for (input, want) in [
            ("/v1/charges", "/v1/charges"),
            ("/v1/charges?x=1&y=/..", "/v1/charges"),
            ("/a/./b/../c", "/a/c"),
            ("/a/%2E%2E/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%2fb".replace("%2f", "%3a").as_str(), "/a%3Ab"),
            ("/a//b", "/a/b"),
            ("/a//../b", "/b"),
            ("/..", "/"),
            ("/a/..", "/"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a\"b", "/a%22b"),
            ("/a{b}", "/a%7Bb%7D"),
            ("/.well-known/x", "/.well-known/x"),
        ] {
            assert_eq!(normalize_target(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn ambiguous_paths() {
        for input in [
            "/a%2Fb", "/a%2fb", "/a%5cb", "/a%00", "/a\\b", "/a%zz", "/a%4", "/a#b", "/a b",
            "relative", "*", "",
        ] {
            assert!(
                normalize_target(input).is_err(),
                "{input} should be refused"
            );
        }
    }

    #[test]
    fn pattern_paths() {
        assert_eq!(normalize_pattern("/v1/*").as_deref(), Ok("/v1/*"));
        assert_eq!(normalize_pattern("/%7e/{a,b}").as_deref(), Ok("/~/{a,b}"));
        assert!(normalize_pattern("/a/../b").is_err());
        assert!(normalize_pattern("/search?q=*").is_err());
        assert!(normalize_pattern("/a//b").is_err());
    }
}
