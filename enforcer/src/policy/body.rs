//! Request bodies: decoding (gzip, deflate), parsing (JSON, form) and body constraints.

use std::{borrow::Cow, cmp::Ordering, io::Read};

use http::{HeaderMap, header};
use serde_json::{Number, Value};

pub(crate) use super::json::{BodyPaths, Doc, Json, json_text};
use super::{
    BODY_INSPECTION_LIMIT,
    json::{parse_form, parse_json},
    jsonpath::JsonPath,
};

/// Decodes and parses a body. The error is the reason it cannot be inspected, to follow
/// "body could not be inspected: ".
pub(crate) fn parse<'a>(
    headers: &HeaderMap,
    body: Option<&'a [u8]>,
    truncated: bool,
    paths: &BodyPaths,
) -> Result<Doc<'a>, String> {
    let over_limit = || {
        format!(
            "body exceeds the {} MiB inspection limit",
            BODY_INSPECTION_LIMIT >> 20
        )
    };
    if truncated {
        return Err(over_limit());
    }
    let Some(raw) = body else {
        return Err("no body".to_owned());
    };
    if raw.len() > BODY_INSPECTION_LIMIT {
        return Err(over_limit());
    }
    let kind = content_kind(headers)?;
    match (kind, decode(headers, raw)?) {
        (Kind::Json, Cow::Borrowed(bytes)) => parse_json(bytes, paths).map(Doc::Json),
        // A decoded body lives only here: its strings are copied out.
        (Kind::Json, Cow::Owned(bytes)) => {
            parse_json(&bytes, paths).map(|j| Doc::Json(j.into_owned()))
        }
        (Kind::Form, bytes) => parse_form(&bytes).map(Doc::Form),
    }
}

enum Kind {
    Json,
    Form,
}

fn content_kind(headers: &HeaderMap) -> Result<Kind, String> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Err("no Content-Type".to_owned());
    };
    if values.next().is_some() {
        return Err("several Content-Type headers".to_owned());
    }
    let value = value
        .to_str()
        .map_err(|_| "Content-Type is not visible ASCII".to_owned())?;
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    for param in parts {
        let (name, val) = param.split_once('=').unwrap_or((param, ""));
        if name.trim().eq_ignore_ascii_case("charset") {
            let val = val.trim().trim_matches('"');
            // Only UTF-8 is read; another charset would make us read other characters than
            // the server does.
            if !val.eq_ignore_ascii_case("utf-8") && !val.eq_ignore_ascii_case("utf8") {
                return Err(format!(
                    "unsupported charset '{val}' (only UTF-8 is inspected)"
                ));
            }
        }
    }
    let is_json = essence == "application/json"
        || essence
            .split_once('/')
            .is_some_and(|(_, sub)| sub.ends_with("+json"));
    if is_json {
        Ok(Kind::Json)
    } else if essence == "application/x-www-form-urlencoded" {
        Ok(Kind::Form)
    } else {
        Err(format!(
            "unsupported Content-Type '{}' (only JSON and form bodies are inspected)",
            value.escape_debug()
        ))
    }
}

fn decode<'a>(headers: &HeaderMap, raw: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value
            .to_str()
            .map_err(|_| "Content-Encoding is not visible ASCII".to_owned())?;
        for coding in value.split(',') {
            let coding = coding.trim().to_ascii_lowercase();
            if !coding.is_empty() && coding != "identity" {
                codings.push(coding);
            }
        }
    }
    match codings.as_slice() {
        [] => Ok(Cow::Borrowed(raw)),
        [one] if one == "gzip" || one == "x-gzip" => {
            let mut decoder = flate2::bufread::GzDecoder::new(raw);
            let out = read_limited(&mut decoder, "gzip")?;
            if !decoder.into_inner().is_empty() {
                return Err("data after the gzip stream".to_owned());
            }
            Ok(Cow::Owned(out))
        }
        [one] if one == "deflate" => {
            // HTTP "deflate" is the zlib format (RFC 9110 8.4.1.2).
            let mut decoder = flate2::bufread::ZlibDecoder::new(raw);
            let out = read_limited(&mut decoder, "deflate")?;
            if !decoder.into_inner().is_empty() {
                return Err("data after the deflate stream".to_owned());
            }
            Ok(Cow::Owned(out))
        }
        [one] => Err(format!(
            "unsupported Content-Encoding '{}'",
            one.escape_debug()
        )),
        _ => Err("several Content-Encodings (only one of gzip, deflate is inspected)".to_owned()),
    }
}

fn read_limited(reader: &mut impl Read, name: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    reader
        .take(BODY_INSPECTION_LIMIT as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| format!("{name} body is corrupt"))?;
    if out.len() > BODY_INSPECTION_LIMIT {
        return Err(format!(
            "decoded body exceeds the {} MiB inspection limit",
            BODY_INSPECTION_LIMIT >> 20
        ));
    }
    Ok(out)
}

/// A number from JSON or from a numeric form string, compared exactly when both are
/// integers.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn of_json(n: &Number) -> Num {
        if let Some(i) = n.as_i64() {
            Num::Int(i.into())
        } else if let Some(u) = n.as_u64() {
            Num::Int(u.into())
        } else {
            Num::Float(n.as_f64().unwrap_or(f64::NAN))
        }
    }

    /// A numeric form string: an integer or a finite decimal (no `inf`, `nan`, spaces).
    fn of_str(s: &str) -> Option<Num> {
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
        {
            return None;
        }
        if let Ok(i) = s.parse::<i128>() {
            return Some(Num::Int(i));
        }
        s.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Num::Float)
    }

    fn of_value(v: &Json<'_>, form: bool) -> Option<Num> {
        match v {
            Json::Num(n) => Some(Num::of_json(n)),
            Json::Str(s) if form => Num::of_str(s),
            _ => None,
        }
    }

    fn cmp(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            #[expect(clippy::cast_precision_loss, reason = "comparison with a float")]
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

/// An operator of a body constraint.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Max(Number),
    Min(Number),
    Eq(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(regex::Regex),
    Exists(bool),
}

/// Every operator name, in the order error messages list them.
pub(crate) const OPERATORS: &[&str] = &[
    "max", "min", "eq", "in", "not_in", "prefix", "suffix", "contains", "regex", "exists",
];

/// Largest compiled regex (and its lazy DFA), in bytes.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Op {
    /// Does one selected value satisfy this operator? (`Exists` is decided on the selection.)
    fn holds(&self, v: &Json<'_>, form: bool) -> bool {
        match self {
            Op::Max(n) => Num::of_value(v, form)
                .and_then(|x| x.cmp(Num::of_json(n)))
                .is_some_and(Ordering::is_le),
            Op::Min(n) => Num::of_value(v, form)
                .and_then(|x| x.cmp(Num::of_json(n)))
                .is_some_and(Ordering::is_ge),
            Op::Eq(want) => scalar_eq(want, v, form),
            Op::In(set) => set.iter().any(|want| scalar_eq(want, v, form)),
            Op::NotIn(set) => !set.iter().any(|want| scalar_eq(want, v, form)),
            Op::Prefix(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
            Op::Suffix(p) => v.as_str().is_some_and(|s| s.ends_with(p.as_str())),
            Op::Contains(p) => v.as_str().is_some_and(|s| s.contains(p.as_str())),
            Op::Regex(re) => v.as_str().is_some_and(|s| re.is_match(s)),
            Op::Exists(_) => true,
        }
    }
}

/// Equality of a constraint's scalar with a body value. No coercion, except that a form
/// value (always a string) is compared with a number numerically and with a bool as text.
fn scalar_eq(want: &Value, v: &Json<'_>, form: bool) -> bool {
    match (want, v) {
        (Value::Number(a), Json::Num(b)) => {
            Num::of_json(a).cmp(Num::of_json(b)) == Some(Ordering::Equal)
        }
        (Value::String(a), Json::Str(b)) => a == b,
        (Value::Bool(a), Json::Bool(b)) => a == b,
        (Value::Null, Json::Null) => true,
        (Value::Number(a), Json::Str(s)) if form => Num::of_str(s)
            .and_then(|x| x.cmp(Num::of_json(a)))
            .is_some_and(Ordering::is_eq),
        (Value::Bool(a), Json::Str(s)) if form => s == if *a { "true" } else { "false" },
        _ => false,
    }
}

/// A body constraint: a JSONPath and operators that must all hold.
#[derive(Debug, Clone)]
pub(crate) struct Constraint {
    pub(crate) path: JsonPath,
    pub(crate) ops: Vec<Op>,
}

/// Shown values are cut to this many characters in reasons.
const SHOWN_VALUE_CHARS: usize = 64;

fn show(v: &Json<'_>) -> String {
    let text = json_text(v);
    if text.chars().count() > SHOWN_VALUE_CHARS {
        let cut: String = text.chars().take(SHOWN_VALUE_CHARS).collect();
        format!("{cut}…")
    } else {
        text
    }
}

impl Constraint {
    /// "$.amount <= 50000" and the like.
    pub(crate) fn describe(&self) -> String {
        let p = &self.path;
        let list = |set: &[Value]| {
            set.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.ops
            .iter()
            .map(|op| match op {
                Op::Max(n) => format!("{p} <= {n}"),
                Op::Min(n) => format!("{p} >= {n}"),
                Op::Eq(v) => format!("{p} == {v}"),
                Op::In(set) => format!("{p} in [{}]", list(set)),
                Op::NotIn(set) => format!("{p} not in [{}]", list(set)),
                Op::Prefix(s) => format!("{p} starts with {}", Value::String(s.clone())),
                Op::Suffix(s) => format!("{p} ends with {}", Value::String(s.clone())),
                Op::Contains(s) => format!("{p} contains {}", Value::String(s.clone())),
                Op::Regex(re) => format!("{p} matches /{}/", re.as_str()),
                Op::Exists(true) => format!("{p} exists"),
                Op::Exists(false) => format!("{p} is absent"),
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }

    fn exists(&self) -> Option<bool> {
        self.ops.iter().find_map(|op| match op {
            Op::Exists(e) => Some(*e),
            _ => None,
        })
    }

    /// For an allow rule: `Ok` when the constraint holds (at least one value selected and
    /// every one satisfies all operators), else what was found instead ("got ...").
    pub(crate) fn check_allow(&self, doc: &Doc<'_>) -> Result<(), String> {
        let selected = doc.select(&self.path);
        if let Some(want) = self.exists() {
            return match (want, selected.first()) {
                (true, Some(_)) | (false, None) => Ok(()),
                (true, None) => Err("got nothing".to_owned()),
                (false, Some(v)) => Err(format!("got {}", show(v))),
            };
        }
        if selected.is_empty() {
            return Err("got nothing".to_owned());
        }
        let form = doc.is_form();
        match selected
            .iter()
            .find(|v| !self.ops.iter().all(|op| op.holds(v, form)))
        {
            None => Ok(()),
            Some(v) => Err(format!("got {}", show(v))),
        }
    }

    /// For a deny rule: `Some(value shown)` when the constraint fires (any selected value
    /// satisfies all operators).
    pub(crate) fn check_deny(&self, doc: &Doc<'_>) -> Option<String> {
        let selected = doc.select(&self.path);
        if let Some(want) = self.exists() {
            return match (want, selected.first()) {
                (true, Some(v)) => Some(format!("got {}", show(v))),
                (false, None) => Some("got nothing".to_owned()),
                _ => None,
            };
        }
        let form = doc.is_form();
        selected
            .iter()
            .find(|v| self.ops.iter().all(|op| op.holds(v, form)))
            .map(|v| format!("got {}", show(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;
    use std::io::Write;

    fn paths() -> BodyPaths {
        let mut p = BodyPaths::default();
        for text in ["$.a", "$[*]", "$.amount"] {
            p.add(&JsonPath::parse(text).unwrap());
        }
        p
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn json_and_form_bodies_parse() {
        let h = headers(&[("content-type", "application/json; charset=UTF-8")]);
        assert!(matches!(
            parse(&h, Some(br#"{"a":1}"#), false, &paths()),
            Ok(Doc::Json(_))
        ));
        let h = headers(&[("content-type", "application/vnd.api+json")]);
        assert!(matches!(
            parse(&h, Some(b"[1]"), false, &paths()),
            Ok(Doc::Json(_))
        ));
        let h = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        let Ok(Doc::Form(pairs)) =
            parse(&h, Some(b"a=1&metadata%5Border_id%5D=x+y"), false, &paths())
        else {
            panic!("form body should parse")
        };
        assert_eq!(
            pairs[1],
            ("metadata[order_id]".to_owned(), Json::Str("x y".into()))
        );
    }

    #[test]
    fn uninspectable_bodies_give_reasons() {
        let json = headers(&[("content-type", "application/json")]);
        for (h, body, truncated, want) in [
            (&json, Some(&b"{"[..]), false, "not JSON"),
            (&json, None, false, "no body"),
            (
                &json,
                Some(&b"{}"[..]),
                true,
                "body exceeds the 1 MiB inspection limit",
            ),
            (
                &json,
                Some(&br#"{"a":1,"a":2}"#[..]),
                false,
                "JSON object has a duplicate key 'a'",
            ),
            (&headers(&[]), Some(&b"{}"[..]), false, "no Content-Type"),
            (
                &headers(&[("content-type", "text/plain")]),
                Some(&b"{}"[..]),
                false,
                "unsupported Content-Type 'text/plain' (only JSON and form bodies are inspected)",
            ),
            (
                &headers(&[
                    ("content-type", "application/json"),
                    ("content-encoding", "br"),
                ]),
                Some(&b"{}"[..]),
                false,
                "unsupported Content-Encoding 'br'",
            ),
            (
                &headers(&[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ]),
                Some(&b"{}"[..]),
                false,
                "gzip body is corrupt",
            ),
            (
                &headers(&[("content-type", "application/x-www-form-urlencoded")]),
                Some(&b"a=%FF"[..]),
                false,
                "form body is not UTF-8",
            ),
        ] {
            assert_eq!(parse(h, body, truncated, &paths()).unwrap_err(), want);
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            parse(&json, Some(deep.as_bytes()), false, &paths()).unwrap_err(),
            "JSON nested deeper than 128 levels"
        );
    }

    #[test]
    fn parsing_builds_only_what_paths_select() {
        let h = headers(&[("content-type", "application/json")]);
        let mut p = BodyPaths::default();
        p.add(&JsonPath::parse("$.items[*].sku").unwrap());
        p.add(&JsonPath::parse("$.pick[1]").unwrap());
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        let body = format!(
            r#"{{"items":[{{"sku":"a","qty":1}},{{"sku":{{"x":[1]}}}}],"pick":[0,1,2],"skip":{deep},"skip":1}}"#
        );
        let Ok(Doc::Json(doc)) = parse(&h, Some(body.as_bytes()), false, &p) else {
            panic!("should parse")
        };
        // Skipped members are gone, skipped elements keep their place, selected values are
        // whole; a duplicate among skipped keys does not matter.
        assert_eq!(
            json_text(&doc),
            r#"{"items":[{"sku":"a"},{"sku":{"x":[1]}}],"pick":[null,1,null]}"#
        );
        // Syntax errors anywhere still make the body uninspectable.
        let bad = r#"{"items":[],"skip":[1,}"#;
        assert_eq!(
            parse(&h, Some(bad.as_bytes()), false, &p).unwrap_err(),
            "not JSON"
        );
        // Deep nesting where values are built is refused.
        let built = format!(r#"{{"items":[{{"sku":{deep}}}]}}"#);
        assert_eq!(
            parse(&h, Some(built.as_bytes()), false, &p).unwrap_err(),
            "JSON nested deeper than 128 levels"
        );
    }

    #[test]
    fn wildcards_and_names_share_the_trie_in_any_order() {
        let h = headers(&[("content-type", "application/json")]);
        let body = br#"{"a":{"b":1,"c":2,"d":9},"x":{"c":3,"d":9},"l":[{"c":4},{"c":5,"e":6}]}"#;
        let texts = ["$.*.c", "$.a.b", "$.l[1].e", "$.l[*].c"];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]] {
            let mut p = BodyPaths::default();
            for i in order {
                p.add(&JsonPath::parse(texts[i]).unwrap());
            }
            let Ok(doc) = parse(&h, Some(body), false, &p) else {
                panic!("should parse")
            };
            let sel = |t: &str| json_text(&doc.select(&JsonPath::parse(t).unwrap()));
            assert_eq!(sel("$.*.c"), "[2,3]", "{order:?}");
            assert_eq!(sel("$.a.b"), "[1]", "{order:?}");
            assert_eq!(sel("$.l[1].e"), "[6]", "{order:?}");
            assert_eq!(sel("$.l[*].c"), "[4,5]", "{order:?}");
            assert_eq!(sel("$.a.d"), "[]", "{order:?}");
        }
    }

    #[test]
    fn gzip_and_deflate_decode() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(br#"{"amount":5}"#).unwrap();
        let gz = gz.finish().unwrap();
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ]);
        assert!(matches!(
            parse(&h, Some(&gz), false, &paths()),
            Ok(Doc::Json(_))
        ));
        let mut twice = gz.clone();
        twice.extend_from_slice(&gz);
        assert_eq!(
            parse(&h, Some(&twice), false, &paths()).unwrap_err(),
            "data after the gzip stream"
        );

        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(br#"{"amount":5}"#).unwrap();
        let z = z.finish().unwrap();
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-encoding", "deflate"),
        ]);
        assert!(matches!(
            parse(&h, Some(&z), false, &paths()),
            Ok(Doc::Json(_))
        ));
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..4 {
            gz.write_all(&zeros).unwrap();
        }
        let gz = gz.finish().unwrap();
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(
            parse(&h, Some(&gz), false, &paths()).unwrap_err(),
            "decoded body exceeds the 1 MiB inspection limit"
        );
    }

    #[test]
    fn numbers_compare_exactly() {
        assert!(Num::of_str("0999999").is_some());
        assert!(Num::of_str("inf").is_none());
        assert!(Num::of_str("NaN").is_none());
        assert!(Num::of_str(" 5").is_none());
        let big = Num::of_json(&Number::from(u64::MAX));
        assert_eq!(
            big.cmp(Num::Int(i128::from(u64::MAX) - 1)),
            Some(Ordering::Greater)
        );
        let float = Json::Num(Number::from_f64(1.0).unwrap());
        let text = Json::Str("1".into());
        assert!(scalar_eq(&json!(1), &float, false));
        assert!(!scalar_eq(&json!(1), &text, false));
        assert!(scalar_eq(&json!(1), &text, true));
        assert!(scalar_eq(&json!(true), &Json::Str("true".into()), true));
    }
}
