//! The JSON value model of request bodies, and selecting values in it by a [`JsonPath`].
//!
//! Bodies are parsed along the paths a policy reads ([`BodyPaths`]): what no path can select
//! is checked for syntax and skipped, not built. Strings borrow from the body when they hold no
//! escape, and objects with a duplicate key are refused.

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Serialize, Serializer,
    de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor},
};
use serde_json::Number;

use super::jsonpath::{JsonPath, Segment};

/// A parsed JSON value. Strings borrow from the body when they hold no escape, and objects
/// are lists of pairs (duplicate keys refused), which keeps parsing to a few allocations.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Num(Number),
    Str(Cow<'a, str>),
    Arr(Vec<Json<'a>>),
    Obj(Vec<(Cow<'a, str>, Json<'a>)>),
    /// An array element no path of the policy can select (kept so indices stay right).
    Skipped,
}

impl Json<'_> {
    pub(crate) fn get(&self, key: &str) -> Option<&Self> {
        match self {
            Json::Obj(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn into_owned(self) -> Json<'static> {
        let owned = |s: Cow<'_, str>| Cow::Owned(s.into_owned());
        match self {
            Json::Null => Json::Null,
            Json::Skipped => Json::Skipped,
            Json::Bool(b) => Json::Bool(b),
            Json::Num(n) => Json::Num(n),
            Json::Str(s) => Json::Str(owned(s)),
            Json::Arr(items) => Json::Arr(items.into_iter().map(Json::into_owned).collect()),
            Json::Obj(pairs) => Json::Obj(
                pairs
                    .into_iter()
                    .map(|(k, v)| (owned(k), v.into_owned()))
                    .collect(),
            ),
        }
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Json::Null | Json::Skipped => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Num(n) => n.serialize(s),
            Json::Str(v) => s.serialize_str(v),
            Json::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Obj(pairs) => {
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Compact JSON text of a value.
pub(crate) fn json_text<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A parsed body.
#[derive(Debug)]
pub(crate) enum Doc<'a> {
    Json(Json<'a>),
    /// Key/value pairs in order; values are `Json::Str`.
    Form(Vec<(String, Json<'a>)>),
}

impl<'a> Doc<'a> {
    pub(crate) fn select<'v>(&'v self, path: &JsonPath) -> Vec<&'v Json<'a>> {
        match self {
            Doc::Json(v) => select(path, v),
            Doc::Form(pairs) => select_form(path, pairs),
        }
    }

    pub(crate) fn is_form(&self) -> bool {
        matches!(self, Doc::Form(_))
    }
}

pub(crate) fn parse_json<'a>(bytes: &'a [u8], paths: &BodyPaths) -> Result<Json<'a>, String> {
    // serde_json keeps its recursion limit (128) where values are built, so deep nesting
    // there is an error, not a stack overflow; values skipped are checked for syntax by
    // serde_json's iterative skipper, whose stack is on the heap.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Guided::read(Some(paths), &mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| {
            let msg = e.to_string();
            if msg.starts_with("recursion limit exceeded") {
                "JSON nested deeper than 128 levels".to_owned()
            } else if let Some(key) = msg.strip_prefix(DUPLICATE_KEY) {
                let key = key.split(" at line").next().unwrap_or_default();
                format!("JSON object has a duplicate key {key}")
            } else {
                "not JSON".to_owned()
            }
        })
}

pub(crate) fn parse_form(bytes: &[u8]) -> Result<Vec<(String, Json<'static>)>, String> {
    // form_urlencoded decodes invalid UTF-8 lossily; refuse it instead, so that what we read
    // is what the server reads. Separators are ASCII, so checking the whole decoded body
    // checks every part.
    if percent_encoding::percent_decode(bytes)
        .decode_utf8()
        .is_err()
    {
        return Err("form body is not UTF-8".to_owned());
    }
    Ok(url::form_urlencoded::parse(bytes)
        .map(|(k, v)| (k.into_owned(), Json::Str(Cow::Owned(v.into_owned()))))
        .collect())
}

/// The JSONPaths a policy reads in bodies, as a trie. A JSON body is parsed along it only:
/// what no path can select is checked for syntax and skipped, not built.
#[derive(Debug, Default, Clone)]
pub(crate) struct BodyPaths {
    /// Some path ends here: build the whole value.
    whole: bool,
    /// Members by name; each already holds what `any` leads to (see [`BodyPaths::add`]).
    names: Vec<(String, BodyPaths)>,
    /// Elements by index, likewise.
    indices: Vec<(usize, BodyPaths)>,
    /// Every member or element (`[*]`, `.*`).
    any: Option<Box<BodyPaths>>,
}

impl BodyPaths {
    pub(crate) fn add(&mut self, path: &JsonPath) {
        self.insert(path.segments());
    }

    fn insert(&mut self, segments: &[Segment]) {
        let Some((first, rest)) = segments.split_first() else {
            self.whole = true;
            return;
        };
        match first {
            Segment::Wildcard => {
                // A wildcard step also goes below every named member and indexed element.
                for (_, child) in &mut self.names {
                    child.insert(rest);
                }
                for (_, child) in &mut self.indices {
                    child.insert(rest);
                }
                self.any.get_or_insert_default().insert(rest);
            }
            Segment::Name(n) => {
                let at = match self.names.iter().position(|(k, _)| k == n) {
                    Some(at) => at,
                    None => {
                        let below = self.any.as_deref().cloned().unwrap_or_default();
                        self.names.push((n.clone(), below));
                        self.names.len() - 1
                    }
                };
                self.names[at].1.insert(rest);
            }
            Segment::Index(i) => {
                let at = match self.indices.iter().position(|(k, _)| k == i) {
                    Some(at) => at,
                    None => {
                        let below = self.any.as_deref().cloned().unwrap_or_default();
                        self.indices.push((*i, below));
                        self.indices.len() - 1
                    }
                };
                self.indices[at].1.insert(rest);
            }
        }
    }

    fn member(&self, key: &str) -> Option<&BodyPaths> {
        self.names
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, c)| c)
            .or(self.any.as_deref())
    }

    fn element(&self, i: usize) -> Option<&BodyPaths> {
        self.indices
            .iter()
            .find(|(k, _)| *k == i)
            .map(|(_, c)| c)
            .or(self.any.as_deref())
    }
}

/// Builds the parts of a JSON value that a [`BodyPaths`] node can select.
struct Guided<'p>(&'p BodyPaths);

impl<'p> Guided<'p> {
    /// How to read a member or element that leads to `node`.
    fn read<'de, D: de::Deserializer<'de>>(
        node: Option<&'p BodyPaths>,
        d: D,
    ) -> Result<Json<'de>, D::Error> {
        match node {
            None => de::IgnoredAny::deserialize(d).map(|_| Json::Skipped),
            Some(n) if n.whole => JsonSeed.deserialize(d),
            Some(n) => Guided(n).deserialize(d),
        }
    }
}

/// [`Guided::read`] as a seed.
struct Along<'p>(Option<&'p BodyPaths>);

impl<'de> DeserializeSeed<'de> for Along<'_> {
    type Value = Json<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        Guided::read(self.0, d)
    }
}

impl<'de> DeserializeSeed<'de> for Guided<'_> {
    type Value = Json<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Guided<'_> {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json<'de>, E> {
        JsonSeed.visit_bool(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json<'de>, E> {
        JsonSeed.visit_i64(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json<'de>, E> {
        JsonSeed.visit_u64(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json<'de>, E> {
        JsonSeed.visit_f64(v)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Json<'de>, E> {
        JsonSeed.visit_borrowed_str(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json<'de>, E> {
        JsonSeed.visit_str(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Json<'de>, E> {
        JsonSeed.visit_string(v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Along(self.0.element(items.len())))? {
            items.push(item);
        }
        Ok(Json::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut pairs = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match self.0.member(&key) {
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                }
                node => pairs.push((key, map.next_value_seed(Along(node))?)),
            }
        }
        check_duplicates(&pairs)?;
        Ok(Json::Obj(pairs))
    }
}

const DUPLICATE_KEY: &str = "duplicate key ";

/// Objects with at most this many keys are checked for duplicates pairwise; larger ones by
/// sorting.
const PAIRWISE_KEYS: usize = 16;

/// A duplicate key is read as the first value by some servers and the last by others;
/// refusing it keeps both readings out.
fn check_duplicates<E: de::Error>(pairs: &[(Cow<'_, str>, Json<'_>)]) -> Result<(), E> {
    let dup = if pairs.len() <= PAIRWISE_KEYS {
        pairs
            .iter()
            .enumerate()
            .find(|(i, (k, _))| pairs[..*i].iter().any(|(other, _)| other == k))
            .map(|(_, (k, _))| k.as_ref())
    } else {
        let mut keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_ref()).collect();
        keys.sort_unstable();
        keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    };
    match dup {
        Some(key) => {
            let shown: String = key.chars().take(64).collect();
            Err(E::custom(format!(
                "{DUPLICATE_KEY}'{}'",
                shown.escape_debug()
            )))
        }
        None => Ok(()),
    }
}

/// Builds a [`Json`], refusing objects with duplicate keys.
struct JsonSeed;

impl<'de> DeserializeSeed<'de> for JsonSeed {
    type Value = Json<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Num(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Num(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Num))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(JsonSeed)? {
            items.push(item);
        }
        Ok(Json::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut pairs = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            pairs.push((key, map.next_value_seed(JsonSeed)?));
        }
        check_duplicates(&pairs)?;
        Ok(Json::Obj(pairs))
    }
}

/// An object key, borrowed from the body when it holds no escape.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// Every value the path selects in a JSON document.
pub(crate) fn select<'v, 'a>(path: &JsonPath, root: &'v Json<'a>) -> Vec<&'v Json<'a>> {
    let mut current = vec![root];
    for segment in path.segments() {
        let mut next = Vec::new();
        for value in current {
            match (segment, value) {
                (Segment::Name(n), v) => next.extend(v.get(n)),
                (Segment::Index(i), Json::Arr(items)) => next.extend(items.get(*i)),
                (Segment::Wildcard, Json::Obj(pairs)) => {
                    next.extend(pairs.iter().map(|(_, v)| v));
                }
                (Segment::Wildcard, Json::Arr(items)) => next.extend(items.iter()),
                _ => {}
            }
        }
        if next.is_empty() {
            return next;
        }
        current = next;
    }
    current
}

/// Every value the path selects in a form body (a flat object of strings in which a key
/// may repeat: `$.key` selects each of its values).
pub(crate) fn select_form<'v, 'a>(
    path: &JsonPath,
    pairs: &'v [(String, Json<'a>)],
) -> Vec<&'v Json<'a>> {
    match path.segments() {
        [Segment::Name(n)] | [Segment::Name(n), Segment::Wildcard] => pairs
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v)
            .collect(),
        [Segment::Wildcard] => pairs.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects() {
        let n = |i: u64| Json::Num(i.into());
        let obj = |k: &'static str, v: Json<'static>| Json::Obj(vec![(k.into(), v)]);
        let doc = Json::Obj(vec![
            (
                "a".into(),
                Json::Arr(vec![obj("b", n(1)), obj("b", n(2)), obj("c", n(3))]),
            ),
            ("k".into(), Json::Str("v".into())),
        ]);
        let sel = |p: &str| {
            select(&JsonPath::parse(p).unwrap(), &doc)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(sel("$.a[*].b"), vec![n(1), n(2)]);
        assert_eq!(sel("$.a[2].c"), vec![n(3)]);
        assert_eq!(sel("$.a[3]"), vec![]);
        assert_eq!(sel("$.k.x"), vec![]);
        assert_eq!(sel("$['k']"), vec![Json::Str("v".into())]);
        assert_eq!(sel("$.*").len(), 2);
    }
}
