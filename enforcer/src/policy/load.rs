//! Loading a policy: the checks in front of serde_yaml (size, UTF-8, expanded node count),
//! the schema, and compilation into rules.
//!
//! Every check runs inside the YAML node it is about, so serde_yaml attaches that node's
//! line and column to the error; the rule is named from the error's path (`rules[N]…`).

use std::{cell::Cell, collections::HashSet, fmt, marker::PhantomData, sync::Arc, time::Duration};

use http::HeaderName;
use serde::{
    Deserialize, Deserializer,
    de::{
        self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor,
        value::MapAccessDeserializer,
    },
};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

use super::{
    MAX_POLICY_BYTES, MAX_RULES, MAX_YAML_DEPTH, Mode, Policy, PolicyError, YAML_NODE_SLACK,
    body::{Constraint, OPERATORS, Op, REGEX_SIZE_LIMIT},
    engine::{Action, HttpScope, Index, Limit, Per, Rule, Scope},
    jsonpath::JsonPath,
    limit::Rate,
    pattern::{HeaderMatch, MethodSet, TcpTarget, UrlPattern},
    window::{self, TimeWindow},
};

const NOT_A_MAPPING: &str =
    "the top level of a policy must be a mapping (agent, default, mode, rules)";
const TAGS: &str = "YAML tags (!name) are not supported in policies";
const EMPTY: &str = "the policy is empty (write at least \"default: deny\")";
const BOMB: &str = "the document expands to more YAML nodes than its size allows \
                    (a YAML alias bomb?); write the policy without such repetition";

pub(crate) fn from_yaml(bytes: &[u8], file: &str) -> Result<Policy, PolicyError> {
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            file: file.to_owned(),
            size: bytes.len(),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        PolicyError::NotUtf8 {
            file: file.to_owned(),
            line,
            column,
        }
    })?;
    // First pass: walk the whole document, aliases expanded, within a node budget; only then
    // is it deserialized for real, so an alias bomb never allocates its expansion. A node
    // takes at least two bytes of text ("a," or "-\n"), so a document without aliases always
    // fits the budget, and a bomb exhausts it after a bounded walk.
    if let Some(line) = too_deep(text) {
        return Err(PolicyError::Invalid {
            file: file.to_owned(),
            line,
            column: 1,
            rule: None,
            message: format!(
                "collections nested deeper than {MAX_YAML_DEPTH} levels; no policy needs that \
                 (flatten the lists)"
            ),
        });
    }
    let budget = Cell::new(bytes.len() / 2 + YAML_NODE_SLACK);
    NodeCounter::root(&budget)
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| document_error(file, &e))?;
    let raw = RawPolicy::deserialize(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| schema_error(file, text, &e))?;

    let rules = raw.rules.0;
    let index = Index::build(&rules);
    Ok(Policy {
        file: file.to_owned(),
        sha256: hex::encode(Sha256::digest(bytes)),
        agent: raw.agent.map(|a| a.0.0),
        default_allow: matches!(raw.default, RawDefault::Allow),
        mode: match raw.mode {
            RawMode::Enforce => Mode::Enforce,
            RawMode::DryRun => Mode::DryRun,
        },
        rules,
        index,
    })
}

/// The line where flow collections first nest deeper than [`MAX_YAML_DEPTH`], found by one
/// linear pass that skips quoted scalars and comments. Block nesting is bounded by the node
/// budget and costs the parser nothing super-linear.
fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut prev_space = true;
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                line += 1;
                prev_space = true;
                continue;
            }
            '#' if prev_space => {
                // A comment runs to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
                prev_space = true;
                continue;
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\n' => line += 1,
                        '\\' if !escaped => {
                            escaped = true;
                            continue;
                        }
                        '"' if !escaped => break,
                        _ => {}
                    }
                    escaped = false;
                }
            }
            '\'' => {
                while let Some(c) = chars.next() {
                    if c == '\n' {
                        line += 1;
                    }
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return Some(line);
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    None
}

/// Every error of a file whose first error is `first`: when that error is inside a rule, every
/// other rule is checked on its own too (in a document of its own, so one bad rule does not
/// hide the next), and reported at the line where it starts.
pub(crate) fn all_errors(first: PolicyError, bytes: &[u8], file: &str) -> Vec<PolicyError> {
    let in_rule = matches!(&first, PolicyError::Invalid { rule: Some(_), .. });
    let rules = std::str::from_utf8(bytes)
        .ok()
        .filter(|_| in_rule)
        .and_then(|text| {
            let doc = serde_yaml::from_str::<serde_yaml::Value>(text).ok()?;
            let rules = doc.get("rules")?.as_sequence()?.clone();
            Some((text, rules))
        });
    let Some((text, rules)) = rules else {
        return vec![first];
    };
    let starts = rule_starts(text, rules.len());
    let key = |e: &PolicyError| match e {
        PolicyError::Invalid { rule, message, .. } => Some((rule.clone(), message.clone())),
        _ => None,
    };
    let first_key = key(&first);
    let mut errors = vec![first];
    for (i, rule) in rules.into_iter().enumerate() {
        let mut single = serde_yaml::Mapping::new();
        single.insert("rules".into(), serde_yaml::Value::Sequence(vec![rule]));
        let Ok(single) = serde_yaml::to_string(&single) else {
            continue;
        };
        let Err(e) = from_yaml(single.as_bytes(), file) else {
            continue;
        };
        if key(&e) == first_key {
            continue;
        }
        errors.push(match e {
            PolicyError::Invalid { rule, message, .. } => {
                let (line, column) = starts.get(i).copied().unwrap_or((0, 0));
                PolicyError::Invalid {
                    file: file.to_owned(),
                    line,
                    column,
                    rule: rule.or_else(|| Some(format!("#{}", i + 1))),
                    message,
                }
            }
            other => other,
        });
    }
    errors
}

/// Where each item of the top-level `rules:` block sequence starts (line, column), when the
/// file is written that way and the count agrees; otherwise none are known.
fn rule_starts(text: &str, count: usize) -> Vec<(usize, usize)> {
    let mut starts = Vec::new();
    let mut inside = false;
    let mut indent = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let depth = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if depth == 0 {
            inside = line.starts_with("rules:");
            continue;
        }
        if inside && (trimmed.starts_with("- ") || trimmed == "-") {
            let at = *indent.get_or_insert(depth);
            if depth == at {
                starts.push((n + 1, depth + 1));
            }
        }
    }
    if starts.len() == count {
        starts
    } else {
        Vec::new()
    }
}

/// Errors of the first pass: YAML syntax, document structure, alias bombs.
fn document_error(file: &str, err: &serde_yaml::Error) -> PolicyError {
    let text = err.to_string();
    let message = match text.as_str() {
        "repetition limit exceeded" => BOMB.to_owned(),
        "EOF while parsing a value" => EMPTY.to_owned(),
        _ => {
            let located = strip_location(&text, err);
            let (_, _, message) = split_path(&located);
            if [EMPTY, BOMB, NOT_A_MAPPING, TAGS].contains(&message.as_str()) {
                message
            } else {
                format!("invalid YAML: {located}")
            }
        }
    };
    located(file, err, None, message)
}

/// Splits serde_yaml's "path: message" into the rule index (for `rules[N]…`), the rest of
/// the path and the message.
fn split_path(message: &str) -> (Option<usize>, String, String) {
    if let Some(after) = message.strip_prefix("rules[")
        && let Some((digits, rest)) = after.split_once(']')
        && let Ok(index) = digits.parse::<usize>()
    {
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        return match rest.strip_prefix(": ") {
            Some(m) => (Some(index), String::new(), m.to_owned()),
            None => match rest.split_once(": ") {
                Some((p, m)) => (Some(index), p.to_owned(), m.to_owned()),
                None => (Some(index), String::new(), rest.to_owned()),
            },
        };
    }
    match message.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (None, p.to_owned(), m.to_owned()),
        _ => (None, String::new(), message.to_owned()),
    }
}

/// Errors of the second pass: the schema and the checks of each rule.
fn schema_error(file: &str, text: &str, err: &serde_yaml::Error) -> PolicyError {
    let (index, path, mut message) = split_path(&strip_location(&err.to_string(), err));
    let rule = index.map(|i| rule_name(text, i));
    // serde's own messages ("unknown field `x`, expected one of `a`, `b`") are reworded and
    // keep the path where they happened; ours already say what they are about.
    const SERDE: &[&str] = &[
        "unknown field",
        "missing field",
        "duplicate field",
        "unknown variant",
        "invalid type",
        "invalid value",
        "invalid length",
    ];
    if SERDE.iter().any(|p| message.starts_with(p)) {
        message = message
            .replace("unknown field", "unknown key")
            .replace("missing field", "missing key")
            .replace("duplicate field", "duplicate key")
            .replace('`', "'");
        if !path.is_empty() {
            message = format!("{path}: {message}");
        }
    }
    located(file, err, rule, message)
}

fn located(
    file: &str,
    err: &serde_yaml::Error,
    rule: Option<String>,
    message: String,
) -> PolicyError {
    match err.location() {
        Some(loc) => PolicyError::Invalid {
            file: file.to_owned(),
            line: loc.line(),
            column: loc.column(),
            rule,
            message,
        },
        None => PolicyError::Document {
            file: file.to_owned(),
            message,
        },
    }
}

/// serde_yaml appends " at line L column C"; the location is reported separately.
fn strip_location(text: &str, err: &serde_yaml::Error) -> String {
    match err.location() {
        Some(loc) => text.replacen(
            &format!(" at line {} column {}", loc.line(), loc.column()),
            "",
            1,
        ),
        None => text.to_owned(),
    }
}

/// The name of rule `index`, read again leniently (the node budget has been checked), or
/// `#N` when it has none.
fn rule_name(text: &str, index: usize) -> String {
    serde_yaml::from_str::<serde_yaml::Value>(text)
        .ok()
        .and_then(|doc| {
            doc.get("rules")?
                .get(index)?
                .get("name")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("#{}", index + 1))
}

/// Walks a document, counting nodes (aliases at every use) against a budget. At the root it
/// also insists on a mapping.
struct NodeCounter<'a> {
    budget: &'a Cell<usize>,
    root: bool,
}

impl<'a> NodeCounter<'a> {
    fn root(budget: &'a Cell<usize>) -> Self {
        NodeCounter { budget, root: true }
    }

    fn child(&self) -> NodeCounter<'a> {
        NodeCounter {
            budget: self.budget,
            root: false,
        }
    }

    fn tick<E: de::Error>(&self) -> Result<(), E> {
        if self.root {
            return Err(E::custom(NOT_A_MAPPING));
        }
        self.count()
    }

    fn count<E: de::Error>(&self) -> Result<(), E> {
        match self.budget.get().checked_sub(1) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(BOMB)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for NodeCounter<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeCounter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML document")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.tick()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.tick()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.tick()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.tick()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.tick()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.tick()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.tick()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if self.root {
            return Err(E::custom(EMPTY));
        }
        self.tick()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.tick()?;
        self.child().deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.tick()?;
        while seq.next_element_seed(self.child())?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.count()?;
        while map.next_key_seed(self.child())?.is_some() {
            map.next_value_seed(self.child())?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(TAGS))
    }
}

// ---------------------------------------------------------------------------------------
// Building blocks: values checked inside their own node.

/// A value read from one scalar and checked inside it.
trait FromScalar: Sized {
    const EXPECTING: &'static str;
    fn from_scalar(s: &str) -> Result<Self, String>;
}

struct Scalar<T>(T);

impl<'de, T: FromScalar> Deserialize<'de> for Scalar<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: FromScalar> Visitor<'_> for V<T> {
            type Value = Scalar<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar<T>, E> {
                T::from_scalar(s).map(Scalar).map_err(E::custom)
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// One value or a list of them (a scalar, a mapping or a sequence). Lists may not be empty.
struct OneOrList<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrList<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrList<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                T::deserialize(s.into_deserializer()).map(|v| OneOrList(vec![v]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|v| OneOrList(vec![v]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom(
                        "empty list (leave the key out to mean any)",
                    ));
                }
                Ok(OneOrList(items))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A mapping read with serde's derive (`Raw`), then compiled inside the same node.
trait Compile: Sized {
    type Raw;
    fn compile(raw: Self::Raw) -> Result<Self, String>;
}

struct Compiled<T>(T);

impl<'de, T: Compile> Deserialize<'de> for Compiled<T>
where
    T::Raw: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Compile> Visitor<'de> for V<T>
        where
            T::Raw: Deserialize<'de>,
        {
            type Value = Compiled<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let raw = T::Raw::deserialize(MapAccessDeserializer::new(map))?;
                T::compile(raw).map(Compiled).map_err(de::Error::custom)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

struct Name(String);

impl FromScalar for Name {
    const EXPECTING: &'static str = "a name";
    fn from_scalar(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.chars().count() > 128 || s.chars().any(char::is_control) {
            return Err(format!(
                "name '{}' must be 1 to 128 characters without control characters",
                s.escape_debug()
            ));
        }
        Ok(Name(s.to_owned()))
    }
}

impl FromScalar for MethodSet {
    const EXPECTING: &'static str = "an HTTP method";
    fn from_scalar(s: &str) -> Result<Self, String> {
        MethodSet::parse_one(s)
    }
}

impl FromScalar for UrlPattern {
    const EXPECTING: &'static str = "a URL pattern";
    fn from_scalar(s: &str) -> Result<Self, String> {
        UrlPattern::parse(s)
    }
}

impl FromScalar for TcpTarget {
    const EXPECTING: &'static str = "a tcp target HOST:PORT";
    fn from_scalar(s: &str) -> Result<Self, String> {
        TcpTarget::parse(s)
    }
}

impl FromScalar for JsonPath {
    const EXPECTING: &'static str = "a JSONPath such as $.amount";
    fn from_scalar(s: &str) -> Result<Self, String> {
        JsonPath::parse(s)
    }
}

impl FromScalar for HeaderName {
    const EXPECTING: &'static str = "a header name";
    fn from_scalar(s: &str) -> Result<Self, String> {
        HeaderMatch::parse_name(s)
    }
}

impl FromScalar for globset::GlobMatcher {
    const EXPECTING: &'static str = "a header value glob";
    fn from_scalar(s: &str) -> Result<Self, String> {
        HeaderMatch::value_glob(s)
    }
}

impl FromScalar for regex::Regex {
    const EXPECTING: &'static str = "a regular expression";
    fn from_scalar(s: &str) -> Result<Self, String> {
        regex::RegexBuilder::new(s)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(_) => format!(
                    "regex '{s}' compiles to more than {} KiB; simplify it",
                    REGEX_SIZE_LIMIT >> 10
                ),
                // The syntax error spans lines (pattern, caret, message); keep the message.
                e => {
                    let text = e.to_string();
                    let last = text.lines().rev().find(|l| !l.trim().is_empty());
                    let why = last
                        .unwrap_or_default()
                        .trim()
                        .trim_start_matches("error: ");
                    format!("invalid regex '{s}': {why}")
                }
            })
    }
}

impl FromScalar for jiff::tz::TimeZone {
    const EXPECTING: &'static str = "an IANA time zone name";
    fn from_scalar(s: &str) -> Result<Self, String> {
        window::zone(s)
    }
}

struct Window(jiff::civil::Time, jiff::civil::Time);

impl FromScalar for Window {
    const EXPECTING: &'static str = "a time window HH:MM-HH:MM";
    fn from_scalar(s: &str) -> Result<Self, String> {
        TimeWindow::parse(s).map(|(a, b)| Window(a, b))
    }
}

/// A JSON scalar written in YAML (`eq`, `in`, `not_in`).
struct JsonScalar(Value);

/// A number written in YAML (`max`, `min`).
struct JsonNumber(Number);

/// Reads a YAML scalar as JSON, inside its node; `numbers` refuses everything but numbers.
struct ScalarVisitor {
    numbers: bool,
}

impl ScalarVisitor {
    fn check<E: de::Error>(&self, v: Value) -> Result<Value, E> {
        if self.numbers && !v.is_number() {
            return Err(E::custom(format!("expected a number, got {v}")));
        }
        Ok(v)
    }
}

impl Visitor<'_> for ScalarVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.numbers {
            "a number"
        } else {
            "a scalar (string, number, true, false or null)"
        })
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.check(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.check(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.check(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        let n = Number::from_f64(v).ok_or_else(|| E::custom("a number must be finite"))?;
        self.check(Value::Number(n))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.check(Value::String(v.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.check(Value::Null)
    }
}

impl<'de> Deserialize<'de> for JsonScalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor { numbers: false })
            .map(JsonScalar)
    }
}

impl<'de> Deserialize<'de> for JsonNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(ScalarVisitor { numbers: true })? {
            Value::Number(n) => Ok(JsonNumber(n)),
            _ => Err(de::Error::custom("expected a number")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The schema.

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum RawDefault {
    Allow,
    #[default]
    Deny,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum RawMode {
    #[default]
    Enforce,
    DryRun,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    agent: Option<Scalar<Name>>,
    #[serde(default)]
    default: RawDefault,
    #[serde(default)]
    mode: RawMode,
    #[serde(default)]
    rules: RuleList,
}

#[derive(Default)]
struct RuleList(Vec<Rule>);

impl<'de> Deserialize<'de> for RuleList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RuleList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of rules")
            }
            fn visit_unit<E: de::Error>(self) -> Result<RuleList, E> {
                Ok(RuleList::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RuleList, A::Error> {
                let mut rules = Vec::new();
                let mut names = HashSet::new();
                while let Some(rule) = seq.next_element_seed(RuleSeed { names: &mut names })? {
                    if rules.len() == MAX_RULES {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_RULES} rules; merge rules with url lists"
                        )));
                    }
                    rules.push(rule);
                }
                Ok(RuleList(rules))
            }
        }
        d.deserialize_any(V)
    }
}

struct RuleSeed<'a> {
    names: &'a mut HashSet<String>,
}

impl<'de> DeserializeSeed<'de> for RuleSeed<'_> {
    type Value = Rule;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Rule, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RuleSeed<'_> {
    type Value = Rule;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rule (a mapping with name and one of allow, deny, limit)")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Rule, A::Error> {
        let raw = RawRule::deserialize(MapAccessDeserializer::new(map))?;
        compile_rule(raw, self.names).map_err(de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Scalar<Name>,
    allow: Option<Compiled<MatchSpec>>,
    deny: Option<Compiled<MatchSpec>>,
    limit: Option<Compiled<LimitSpec>>,
    /// Held for a human (extension): matched like `allow`.
    ask: Option<Compiled<MatchSpec>>,
    /// On a deny: what it does not cover (extension), with the same match keys.
    except: Option<Compiled<MatchSpec>>,
    /// How long an `ask` holds the request: `120s`, `2m` (default 60 s, at most 600 s).
    timeout: Option<String>,
    body: Option<OneOrList<Constraint>>,
    query: Option<QuerySpec>,
    dns_labels: Option<DnsLabels>,
    binaries: Option<Vec<RawBinary>>,
}

/// A `binaries:` entry: a path, or a path with the sha256 its content must have.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawBinary {
    Path(String),
    Hashed(HashedBinary),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HashedBinary {
    path: String,
    sha256: String,
}

fn compile_binaries(raw: Vec<RawBinary>) -> Result<super::binaries::Binaries, String> {
    use super::binaries::{Binaries, Binary};
    if raw.is_empty() {
        return Err("binaries is empty; list the executables, or leave the key out".to_owned());
    }
    let mut list = Vec::new();
    for b in raw {
        let (path, sha256) = match b {
            RawBinary::Path(p) => (p, None),
            RawBinary::Hashed(h) => (h.path, Some(h.sha256)),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "binaries: '{path}' is not an absolute path (the kernel names executables by \
                 their file, so give the full path)"
            ));
        }
        let sha256 = match sha256 {
            None => None,
            Some(h) => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(h.trim(), &mut out).map_err(|_| {
                    format!("binaries: sha256 of {path} must be 64 hex digits, got '{h}'")
                })?;
                Some(out)
            }
        };
        list.push(Binary {
            path: path.into(),
            sha256,
        });
    }
    Ok(Binaries::new(list))
}

/// `dns_labels:` of a rule.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum DnsLabels {
    /// Labels of names allowed through a wildcard must look like names: at most 40
    /// characters, not encoded data (the default).
    Plain,
    /// No limit on those labels: for CDNs and clouds whose host names carry ids.
    Any,
}

/// How long an `ask` holds a request when its rule says nothing.
const ASK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// The longest an `ask` may hold one.
const ASK_TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// `120s`, `2m`, `90` (seconds): at least 1 s, at most 600 s.
fn parse_ask_timeout(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let secs: u64 = match (n.parse::<u64>(), unit) {
        (Ok(n), "" | "s") => n,
        (Ok(n), "m") => n.saturating_mul(60),
        _ => {
            return Err(format!(
                "timeout '{text}' is not a duration; write it like 120s or 2m"
            ));
        }
    };
    let d = Duration::from_secs(secs);
    if d.is_zero() || d > ASK_TIMEOUT_MAX {
        return Err(format!("timeout '{text}' must be between 1s and 600s"));
    }
    Ok(d)
}

fn compile_rule(raw: RawRule, names: &mut HashSet<String>) -> Result<Rule, String> {
    let name = raw.name.0.0;
    if !names.insert(name.clone()) {
        return Err(format!(
            "duplicate rule name '{name}' (rule names must be unique)"
        ));
    }
    let body = raw.body.map(|b| b.0).unwrap_or_default();
    let query = raw.query;
    if raw.timeout.is_some() && raw.ask.is_none() {
        return Err("timeout goes with ask rules (how long a request is held)".to_owned());
    }
    let (action, scope) = match (raw.allow, raw.deny, raw.limit, raw.ask) {
        (None, None, None, Some(m)) => {
            let timeout = match raw.timeout.as_deref() {
                None => ASK_TIMEOUT_DEFAULT,
                Some(t) => parse_ask_timeout(t)?,
            };
            let scope = m.0.with_body(body, query)?;
            if matches!(scope, Scope::Tcp(_)) {
                return Err("an ask rule judges HTTP requests; it cannot take tcp".to_owned());
            }
            (Action::Ask(timeout), scope)
        }
        (Some(m), None, None, None) => (Action::Allow, m.0.with_body(body, query)?),
        (None, Some(m), None, None) => (Action::Deny, m.0.with_body(body, query)?),
        (None, None, Some(l), None) => {
            if query.is_some() {
                return Err("query constraints go with allow or deny, not limit".to_owned());
            }
            if !body.is_empty() {
                return Err(
                    "body constraints go with allow or deny, not limit (use field with per: body_field)"
                        .to_owned(),
                );
            }
            let LimitSpec { limit, scope } = l.0;
            (Action::Limit(limit), Scope::Http(scope))
        }
        (None, None, None, None) => {
            return Err("a rule needs one of allow, deny, limit or ask".to_owned());
        }
        _ => {
            return Err(
                "a rule takes exactly one of allow, deny, limit or ask; split it into several rules"
                    .to_owned(),
            );
        }
    };
    let dns_labels_any = raw.dns_labels == Some(DnsLabels::Any);
    if raw.dns_labels.is_some() && !matches!(action, Action::Allow) {
        return Err("dns_labels goes with allow rules (it widens what they allow)".to_owned());
    }
    let binaries = raw.binaries.map(compile_binaries).transpose()?;
    let except = match raw.except {
        None => None,
        Some(_) if !matches!(action, Action::Deny) => {
            return Err("except goes with deny rules (it narrows what they deny)".to_owned());
        }
        Some(e) => {
            let e = e.0.with_body(Vec::new(), None)?;
            if matches!(e, Scope::Tcp(_)) != matches!(scope, Scope::Tcp(_)) {
                return Err(
                    "except takes the same kind of match as its deny: tcp with tcp, url with url"
                        .to_owned(),
                );
            }
            Some(e)
        }
    };
    Ok(Rule {
        name: Arc::from(name),
        action,
        scope,
        dns_labels_any,
        binaries,
        except,
    })
}

/// An `allow:` / `deny:` mapping, before the rule's `body` is attached.
struct MatchSpec(Scope);

impl MatchSpec {
    fn with_body(self, body: Vec<Constraint>, query: Option<QuerySpec>) -> Result<Scope, String> {
        match self.0 {
            Scope::Http(mut http) => {
                http.body = body;
                match query {
                    None => {}
                    Some(QuerySpec::None) => http.query_none = true,
                    Some(QuerySpec::Constraints(list)) => http.query = list,
                }
                Ok(Scope::Http(http))
            }
            Scope::Tcp(_) if !body.is_empty() => {
                Err("a tcp rule cannot have body constraints".to_owned())
            }
            Scope::Tcp(_) if query.is_some() => {
                Err("a tcp rule cannot have query constraints".to_owned())
            }
            tcp @ Scope::Tcp(_) => Ok(tcp),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    method: Option<OneOrList<Scalar<MethodSet>>>,
    url: Option<OneOrList<Scalar<UrlPattern>>>,
    headers: Option<Headers>,
    time_outside: Option<Scalar<Window>>,
    time_inside: Option<Scalar<Window>>,
    timezone: Option<Scalar<jiff::tz::TimeZone>>,
    tcp: Option<OneOrList<Scalar<TcpTarget>>>,
}

fn methods(list: Option<OneOrList<Scalar<MethodSet>>>) -> Option<MethodSet> {
    list.map(|l| {
        l.0.into_iter()
            .map(|m| m.0)
            .reduce(MethodSet::union)
            .unwrap_or(MethodSet::EMPTY)
    })
}

fn urls(list: Option<OneOrList<Scalar<UrlPattern>>>) -> Option<Vec<UrlPattern>> {
    list.map(|l| l.0.into_iter().map(|u| u.0).collect())
}

impl Compile for MatchSpec {
    type Raw = RawMatch;
    fn compile(raw: RawMatch) -> Result<Self, String> {
        if let Some(tcp) = raw.tcp {
            if raw.method.is_some()
                || raw.url.is_some()
                || raw.headers.is_some()
                || raw.time_outside.is_some()
                || raw.time_inside.is_some()
                || raw.timezone.is_some()
            {
                return Err(
                    "tcp takes no other key (method, url, headers and time windows are HTTP)"
                        .to_owned(),
                );
            }
            return Ok(MatchSpec(Scope::Tcp(
                tcp.0.into_iter().map(|t| t.0).collect(),
            )));
        }
        let window = match (raw.time_outside, raw.time_inside) {
            (Some(_), Some(_)) => {
                return Err("use one of time_outside and time_inside, not both".to_owned());
            }
            (Some(w), None) => Some((w.0, true)),
            (None, Some(w)) => Some((w.0, false)),
            (None, None) => None,
        };
        let zone = raw.timezone.map(|z| z.0);
        let window = match (window, zone) {
            (Some((Window(start, end), outside)), zone) => Some(TimeWindow::new(
                start,
                end,
                outside,
                zone.unwrap_or(jiff::tz::TimeZone::UTC),
            )),
            (None, Some(_)) => {
                return Err("timezone needs time_outside or time_inside".to_owned());
            }
            (None, None) => None,
        };
        Ok(MatchSpec(Scope::Http(HttpScope {
            methods: methods(raw.method),
            urls: urls(raw.url),
            headers: raw.headers.map(|h| h.0).unwrap_or_default(),
            window,
            ..HttpScope::default()
        })))
    }
}

/// `headers:` map of name to value glob.
struct Headers(Vec<HeaderMatch>);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of header name to value glob")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut out: Vec<HeaderMatch> = Vec::new();
                while let Some(Scalar(name)) = map.next_key::<Scalar<HeaderName>>()? {
                    let Scalar(glob) = map.next_value::<Scalar<globset::GlobMatcher>>()?;
                    if out.iter().any(|h| h.name == name) {
                        return Err(de::Error::custom(format!(
                            "header '{name}' is listed twice (names are case-insensitive)"
                        )));
                    }
                    out.push(HeaderMatch::new(name, glob));
                }
                Ok(Headers(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawPer {
    Agent,
    Endpoint,
    BodyField,
    Header,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    calls_per_second: Option<u32>,
    calls_per_minute: Option<u32>,
    calls_per_hour: Option<u32>,
    per: Option<RawPer>,
    field: Option<Scalar<JsonPath>>,
    header: Option<Scalar<HeaderName>>,
    method: Option<OneOrList<Scalar<MethodSet>>>,
    url: Option<OneOrList<Scalar<UrlPattern>>>,
}

/// Most calls a limit may allow per window.
const MAX_CALLS: u32 = 1_000_000;

/// A `limit:` mapping: the limit and the requests it counts.
struct LimitSpec {
    limit: Limit,
    scope: HttpScope,
}

impl Compile for LimitSpec {
    type Raw = RawLimit;
    fn compile(raw: RawLimit) -> Result<Self, String> {
        let (calls, window, unit) = match (
            raw.calls_per_second,
            raw.calls_per_minute,
            raw.calls_per_hour,
        ) {
            (Some(n), None, None) => (n, Duration::from_secs(1), "second"),
            (None, Some(n), None) => (n, Duration::from_secs(60), "minute"),
            (None, None, Some(n)) => (n, Duration::from_secs(3600), "hour"),
            (None, None, None) => {
                return Err(
                    "a limit needs one of calls_per_second, calls_per_minute, calls_per_hour"
                        .to_owned(),
                );
            }
            _ => {
                return Err(
                    "a limit takes one of calls_per_second, calls_per_minute, calls_per_hour; use one rule per rate"
                        .to_owned(),
                );
            }
        };
        if calls == 0 || calls > MAX_CALLS {
            return Err(format!(
                "calls_per_{unit} must be from 1 to {MAX_CALLS} (a deny rule blocks all calls)"
            ));
        }
        let per = match (raw.per.unwrap_or(RawPer::Agent), raw.field, raw.header) {
            (RawPer::Agent, None, None) => Per::Agent,
            (RawPer::Endpoint, None, None) => Per::Endpoint,
            (RawPer::BodyField, Some(f), None) => Per::BodyField(f.0),
            (RawPer::Header, None, Some(h)) => Per::Header(h.0),
            (RawPer::BodyField, None, _) => {
                return Err("per: body_field needs field: JSONPATH (e.g. \"$.model\")".to_owned());
            }
            (RawPer::Header, _, None) => {
                return Err("per: header needs header: NAME".to_owned());
            }
            (_, Some(_), _) => return Err("field goes with per: body_field only".to_owned()),
            (_, _, Some(_)) => return Err("header goes with per: header only".to_owned()),
        };
        let per_text = match &per {
            Per::Agent => "for the agent".to_owned(),
            Per::Endpoint => "per endpoint".to_owned(),
            Per::BodyField(p) => format!("per {p}"),
            Per::Header(h) => format!("per {h} header"),
        };
        Ok(LimitSpec {
            limit: Limit {
                rate: Rate { calls, window },
                per,
                describe: format!("{calls} calls per {unit} {per_text}"),
            },
            scope: HttpScope {
                methods: methods(raw.method),
                urls: urls(raw.url),
                ..HttpScope::default()
            },
        })
    }
}

// ---------------------------------------------------------------------------------------
// Body constraints.

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum ConstraintKey {
    Jsonpath,
    Param,
    Op(usize),
}

impl FromScalar for ConstraintKey {
    const EXPECTING: &'static str = "jsonpath, param or an operator";
    fn from_scalar(s: &str) -> Result<Self, String> {
        if s == "jsonpath" {
            return Ok(ConstraintKey::Jsonpath);
        }
        if s == "param" {
            return Ok(ConstraintKey::Param);
        }
        OPERATORS
            .iter()
            .position(|op| *op == s)
            .map(ConstraintKey::Op)
            .ok_or_else(|| {
                format!(
                    "unknown operator '{}' (expected one of {})",
                    s.escape_debug(),
                    OPERATORS.join(", ")
                )
            })
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ConstraintVisitor { query: false })
    }
}

/// A `query:` constraint: `param` (a query parameter's name) and the body operators.
struct QueryConstraint(Constraint);

impl<'de> Deserialize<'de> for QueryConstraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ConstraintVisitor { query: true })
            .map(QueryConstraint)
    }
}

/// `query:` of a rule: `none`, or one constraint or a list.
enum QuerySpec {
    None,
    Constraints(Vec<Constraint>),
}

impl<'de> Deserialize<'de> for QuerySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = QuerySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("none, or a query constraint (param and an operator) or a list")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<QuerySpec, E> {
                if v == "none" {
                    Ok(QuerySpec::None)
                } else {
                    Err(E::custom(format!(
                        "query: '{}' is not none or a constraint (e.g. {{ param: amount, max: 100 }})",
                        v.escape_debug()
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<QuerySpec, A::Error> {
                let c = QueryConstraint::deserialize(MapAccessDeserializer::new(map))?;
                Ok(QuerySpec::Constraints(vec![c.0]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<QuerySpec, A::Error> {
                let mut list = Vec::new();
                while let Some(c) = seq.next_element::<QueryConstraint>()? {
                    list.push(c.0);
                }
                Ok(QuerySpec::Constraints(list))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a constraint: `jsonpath` for a body, `param` for a query string.
struct ConstraintVisitor {
    query: bool,
}

impl<'de> Visitor<'de> for ConstraintVisitor {
    type Value = Constraint;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.query {
            "a query constraint (param and an operator)"
        } else {
            "a body constraint (jsonpath and an operator)"
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Constraint, A::Error> {
        let mut path = None;
        let mut ops = Vec::new();
        let mut seen = HashSet::new();
        while let Some(Scalar(key)) = map.next_key::<Scalar<ConstraintKey>>()? {
            if !seen.insert(key) {
                return Err(de::Error::custom("a key appears twice in one constraint"));
            }
            let name = match key {
                ConstraintKey::Jsonpath if !self.query => {
                    path = Some(map.next_value::<Scalar<JsonPath>>()?.0);
                    continue;
                }
                ConstraintKey::Param if self.query => {
                    let name: String = map.next_value()?;
                    if name.is_empty() || name.len() > 256 {
                        return Err(de::Error::custom(
                            "param must name a query parameter (1-256 characters)",
                        ));
                    }
                    path = Some(JsonPath::member(&name));
                    continue;
                }
                ConstraintKey::Jsonpath => {
                    return Err(de::Error::custom(
                        "a query constraint names its parameter with param, not jsonpath",
                    ));
                }
                ConstraintKey::Param => {
                    return Err(de::Error::custom(
                        "a body constraint takes jsonpath; param goes in query:",
                    ));
                }
                ConstraintKey::Op(i) => OPERATORS[i],
            };
            let op = match name {
                "max" => Op::Max(map.next_value::<JsonNumber>()?.0),
                "min" => Op::Min(map.next_value::<JsonNumber>()?.0),
                "eq" => Op::Eq(map.next_value::<JsonScalar>()?.0),
                "in" | "not_in" => {
                    let set: Vec<Value> = map
                        .next_value::<OneOrList<JsonScalar>>()?
                        .0
                        .into_iter()
                        .map(|v| v.0)
                        .collect();
                    if name == "in" {
                        Op::In(set)
                    } else {
                        Op::NotIn(set)
                    }
                }
                "prefix" => Op::Prefix(map.next_value()?),
                "suffix" => Op::Suffix(map.next_value()?),
                "contains" => Op::Contains(map.next_value()?),
                "regex" => Op::Regex(map.next_value::<Scalar<regex::Regex>>()?.0),
                _ => Op::Exists(map.next_value()?),
            };
            ops.push(op);
        }
        let path = path.ok_or_else(|| {
            de::Error::custom(if self.query {
                "a query constraint needs param (e.g. amount)"
            } else {
                "a body constraint needs jsonpath (e.g. \"$.amount\")"
            })
        })?;
        if ops.is_empty() {
            return Err(de::Error::custom(format!(
                "constraint on {path} needs an operator (one of {})",
                OPERATORS.join(", ")
            )));
        }
        if ops.len() > 1 && ops.iter().any(|op| matches!(op, Op::Exists(_))) {
            return Err(de::Error::custom(
                "exists cannot be combined with other operators; write two constraints",
            ));
        }
        Ok(Constraint { path, ops })
    }
}
