//! Mango, CouchDB's query language: selectors, the order of JSON values,
//! `fields`, `sort` and json index definitions. Everything here is pure
//! (no store): `api.rs` scans documents and asks [`Selector::matches`].
//!
//! A selector is parsed once into a tree ([`Selector`]) and then matched
//! against each document. The rules follow CouchDB's:
//! * an object is an `$and` of its members; a member whose key is not an
//!   operator names a field (`a.b.c`, `\.` for a dot inside a name), and
//!   a value that is not an object of operators is `$eq`;
//! * a condition on a field the document does not have is false, except
//!   `$exists: false`;
//! * `$not`, `$nor` negate conditions down to the fields (as CouchDB
//!   normalises them), so a negated condition still needs its field,
//!   except for `$exists`.

use std::cmp::Ordering;

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MangoError {
    /// an operator Mango does not have, or one in the wrong place
    #[error("Invalid operator: {0}")]
    InvalidOperator(String),
    /// an operator's argument is not what it takes
    #[error("{0}")]
    BadArg(String),
    /// sort fields with different directions
    #[error("Sorts currently only support a single direction for all fields.")]
    MixedSort,
}

/// One node of a parsed selector, matched against the value at hand (the
/// document at the top, a field's value below [`Selector::Field`]).
#[derive(Debug, Clone)]
pub enum Selector {
    And(Vec<Selector>),
    Or(Vec<Selector>),
    Not(Box<Selector>),
    /// The value at this path (from the value at hand) must match.
    Field(Vec<String>, Box<Selector>),
    /// A condition on the value at hand.
    Op(Cond),
}

#[derive(Debug, Clone)]
pub enum Cond {
    Eq(Value),
    Ne(Value),
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Type(String),
    Regex(Box<regex_automata::meta::Regex>),
    All(Vec<Value>),
    ElemMatch(Box<Selector>),
    AllMatch(Box<Selector>),
    Size(u64),
    Mod(i64, i64),
}

/// Longest `$regex` pattern taken (the engine is linear in the text, but
/// a huge pattern still costs memory to compile).
const MAX_REGEX: usize = 4096;
/// Most `$regex` conditions one selector may hold: each is compiled for
/// every request, so their number bounds a request's compile cost.
const MAX_REGEXES: usize = 8;
/// Heap one `$regex`'s compiled NFA may take. A short pattern can still be
/// costly: Unicode's `\w` alone is about 50 KB, so `\w{200}` is 10 MB and
/// takes up to a second to compile with the engine's default limit. The
/// builder stops as soon as it passes this one, so a refused pattern costs
/// little, and eight that fit cost about 8 MiB and a tenth of a second at
/// most. Within it: `\w{20}`, `\pL{20}`, `(?-u:\w){200}`.
const REGEX_NFA_LIMIT: usize = 1024 * 1024;
/// Lazy DFA cache of one `$regex` per searching thread (the engine's
/// default is 2 MiB; past it, the cache is cleared or the slower PikeVM
/// runs, never more memory).
const REGEX_DFA_CACHE: usize = 1024 * 1024;
/// Nesting of a selector beyond which it is refused (no stack overflow on
/// a hostile body).
const MAX_DEPTH: usize = 64;

impl Selector {
    /// Parses a selector (the `selector` member of a `_find` body).
    pub fn parse(v: &Value) -> Result<Selector, MangoError> {
        match v {
            Value::Object(m) => parse_object(m, 0, &mut Budget::default()),
            _ => Err(MangoError::BadArg("selector must be a JSON object".into())),
        }
    }

    /// Whether a document (as a client sees it, `_id` included) matches.
    pub fn matches(&self, doc: &Value) -> bool {
        eval(self, Some(doc), false)
    }

    /// Fields every matching document has (what an index on them may
    /// narrow to): the fields of conditions joined by `$and`, other than
    /// `$exists: false`, and fields every branch of an `$or` requires.
    pub fn required_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        required(self, None, &mut out);
        out.sort();
        out.dedup();
        out
    }
}

/// What one selector has spent of its limits while it is parsed.
#[derive(Default)]
struct Budget {
    regexes: usize,
}

fn parse_object(
    m: &Map<String, Value>,
    depth: usize,
    budget: &mut Budget,
) -> Result<Selector, MangoError> {
    if depth > MAX_DEPTH {
        return Err(MangoError::BadArg(
            "the selector is nested too deeply".into(),
        ));
    }
    let mut parts = Vec::with_capacity(m.len());
    for (k, v) in m {
        parts.push(parse_member(k, v, depth + 1, budget)?);
    }
    Ok(if parts.len() == 1 {
        parts.pop().unwrap_or(Selector::And(Vec::new()))
    } else {
        Selector::And(parts)
    })
}

fn selectors(
    op: &str,
    v: &Value,
    depth: usize,
    budget: &mut Budget,
) -> Result<Vec<Selector>, MangoError> {
    let Value::Array(items) = v else {
        return Err(MangoError::BadArg(format!(
            "{op} takes an array of selectors"
        )));
    };
    items
        .iter()
        .map(|i| match i {
            Value::Object(m) => parse_object(m, depth, budget),
            _ => Err(MangoError::BadArg(format!(
                "{op} takes an array of selectors"
            ))),
        })
        .collect()
}

fn values(op: &str, v: &Value) -> Result<Vec<Value>, MangoError> {
    match v {
        Value::Array(a) => Ok(a.clone()),
        _ => Err(MangoError::BadArg(format!("{op} takes an array"))),
    }
}

fn sub_selector(
    op: &str,
    v: &Value,
    depth: usize,
    budget: &mut Budget,
) -> Result<Selector, MangoError> {
    match v {
        Value::Object(m) => parse_object(m, depth, budget),
        _ => Err(MangoError::BadArg(format!("{op} takes a selector object"))),
    }
}

fn parse_member(
    k: &str,
    v: &Value,
    depth: usize,
    budget: &mut Budget,
) -> Result<Selector, MangoError> {
    if !k.starts_with('$') {
        let path = split_path(k);
        // An object of operators is their `$and`; any other object is a
        // path further down, or (empty, or an array, or a scalar) `$eq`.
        let inner = match v {
            Value::Object(m) if !m.is_empty() => parse_object(m, depth, budget)?,
            other => Selector::Op(Cond::Eq(other.clone())),
        };
        return Ok(Selector::Field(path, Box::new(inner)));
    }
    let cond = match k {
        "$and" => return Ok(Selector::And(selectors(k, v, depth, budget)?)),
        "$or" => return Ok(Selector::Or(selectors(k, v, depth, budget)?)),
        "$nor" => {
            let all = selectors(k, v, depth, budget)?;
            return Ok(Selector::Not(Box::new(Selector::Or(all))));
        }
        "$not" => return Ok(Selector::Not(Box::new(sub_selector(k, v, depth, budget)?))),
        "$eq" => Cond::Eq(v.clone()),
        "$ne" => Cond::Ne(v.clone()),
        "$gt" => Cond::Gt(v.clone()),
        "$gte" => Cond::Gte(v.clone()),
        "$lt" => Cond::Lt(v.clone()),
        "$lte" => Cond::Lte(v.clone()),
        "$in" => Cond::In(values(k, v)?),
        "$nin" => Cond::Nin(values(k, v)?),
        "$all" => Cond::All(values(k, v)?),
        "$exists" => Cond::Exists(
            v.as_bool()
                .ok_or_else(|| MangoError::BadArg("$exists takes true or false".into()))?,
        ),
        "$type" => {
            let t = v.as_str().unwrap_or("");
            if !matches!(
                t,
                "null" | "boolean" | "number" | "string" | "array" | "object"
            ) {
                return Err(MangoError::BadArg(
                    "$type takes one of null, boolean, number, string, array, object".into(),
                ));
            }
            Cond::Type(t.to_owned())
        }
        "$regex" => {
            let p = v
                .as_str()
                .ok_or_else(|| MangoError::BadArg("$regex takes a string".into()))?;
            if p.len() > MAX_REGEX {
                return Err(MangoError::BadArg(format!(
                    "$regex patterns may be at most {MAX_REGEX} bytes"
                )));
            }
            budget.regexes += 1;
            if budget.regexes > MAX_REGEXES {
                return Err(MangoError::BadArg(format!(
                    "a selector may hold at most {MAX_REGEXES} $regex conditions"
                )));
            }
            Cond::Regex(Box::new(compile_regex(p)?))
        }
        "$size" => Cond::Size(
            v.as_u64()
                .ok_or_else(|| MangoError::BadArg("$size takes a non-negative integer".into()))?,
        ),
        "$mod" => {
            let pair = v.as_array().filter(|a| a.len() == 2);
            let d = pair.and_then(|a| a[0].as_i64());
            let r = pair.and_then(|a| a[1].as_i64());
            match (d, r) {
                (Some(d), Some(r)) if d != 0 => Cond::Mod(d, r),
                _ => {
                    return Err(MangoError::BadArg(
                        "$mod takes [Divisor, Remainder], integers, the divisor not 0".into(),
                    ))
                }
            }
        }
        "$elemMatch" => Cond::ElemMatch(Box::new(sub_selector(k, v, depth, budget)?)),
        "$allMatch" => Cond::AllMatch(Box::new(sub_selector(k, v, depth, budget)?)),
        _ => return Err(MangoError::InvalidOperator(k.to_owned())),
    };
    Ok(Selector::Op(cond))
}

/// Compiles a `$regex` within [`REGEX_NFA_LIMIT`], so a costly pattern is
/// refused early instead of compiled at length.
fn compile_regex(p: &str) -> Result<regex_automata::meta::Regex, MangoError> {
    use regex_automata::meta;
    let config = meta::Config::new()
        .nfa_size_limit(Some(REGEX_NFA_LIMIT))
        .hybrid_cache_capacity(REGEX_DFA_CACHE);
    meta::Regex::builder()
        .configure(config)
        .build(p)
        .map_err(|e| {
            MangoError::BadArg(if e.size_limit().is_some() {
                format!(
                    "$regex too complex: it compiles to more than {} KiB (a Unicode class such as \\w or \\pL repeated many times costs the most; an ASCII class such as [A-Za-z0-9_] or (?-u:\\w) is far smaller)",
                    REGEX_NFA_LIMIT / 1024
                )
            } else {
                format!("$regex: {e}")
            })
        })
}

/// `a.b\.c` -> `["a", "b.c"]`.
pub fn split_path(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push(chars.next().unwrap_or('\\')),
            '.' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The value at `path` below `v` (array elements by index).
pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = match cur {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Matches `sel` against `v` (`None`: the field is missing), negated when
/// `neg` (pushed down to the conditions, as CouchDB normalises `$not`).
fn eval(sel: &Selector, v: Option<&Value>, neg: bool) -> bool {
    match sel {
        Selector::And(xs) if neg => xs.iter().any(|x| eval(x, v, true)),
        Selector::And(xs) => xs.iter().all(|x| eval(x, v, false)),
        // An empty `$or` is true, like an empty `$and`.
        Selector::Or(xs) if xs.is_empty() => !neg,
        Selector::Or(xs) if neg => xs.iter().all(|x| eval(x, v, true)),
        Selector::Or(xs) => xs.iter().any(|x| eval(x, v, false)),
        Selector::Not(x) => eval(x, v, !neg),
        Selector::Field(path, inner) => eval(inner, v.and_then(|v| get_path(v, path)), neg),
        Selector::Op(c) => match v {
            // Missing: only `$exists: false` (after negation) holds.
            None => matches!(c, Cond::Exists(want) if *want == neg),
            Some(v) => cond(c, v) != neg,
        },
    }
}

fn cond(c: &Cond, v: &Value) -> bool {
    match c {
        Cond::Eq(a) => compare(v, a) == Ordering::Equal,
        Cond::Ne(a) => compare(v, a) != Ordering::Equal,
        Cond::Gt(a) => compare(v, a) == Ordering::Greater,
        Cond::Gte(a) => compare(v, a) != Ordering::Less,
        Cond::Lt(a) => compare(v, a) == Ordering::Less,
        Cond::Lte(a) => compare(v, a) != Ordering::Greater,
        Cond::In(args) => in_args(v, args),
        Cond::Nin(args) => args.is_empty() || !in_args(v, args),
        Cond::Exists(want) => *want,
        Cond::Type(t) => type_name(v) == t,
        Cond::Regex(re) => v.as_str().is_some_and(|s| re.is_match(s)),
        Cond::All(args) => match v {
            Value::Array(items) if !args.is_empty() => {
                let has = |a: &Value| items.iter().any(|i| compare(i, a) == Ordering::Equal);
                args.iter().all(has)
                    || matches!(args.as_slice(), [Value::Array(one)] if compare(&Value::Array(one.clone()), v) == Ordering::Equal)
            }
            _ => false,
        },
        Cond::ElemMatch(s) => match v {
            Value::Array(items) => items.iter().any(|i| eval(s, Some(i), false)),
            _ => false,
        },
        Cond::AllMatch(s) => match v {
            Value::Array(items) if !items.is_empty() => {
                items.iter().all(|i| eval(s, Some(i), false))
            }
            _ => false,
        },
        Cond::Size(n) => v.as_array().is_some_and(|a| a.len() as u64 == *n),
        // `wrapping_rem`: `i64::MIN % -1` overflows `%` (the remainder is 0).
        Cond::Mod(d, r) => v.as_i64().is_some_and(|x| x.wrapping_rem(*d) == *r),
    }
}

/// `$in`: the value is one of the arguments, or (an array) has one of them.
fn in_args(v: &Value, args: &[Value]) -> bool {
    match v {
        Value::Array(items) => args
            .iter()
            .any(|a| items.iter().any(|i| compare(i, a) == Ordering::Equal)),
        _ => args.iter().any(|a| compare(v, a) == Ordering::Equal),
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(false) => 1,
        Value::Bool(true) => 2,
        Value::Number(_) => 3,
        Value::String(_) => 4,
        Value::Array(_) => 5,
        Value::Object(_) => 6,
    }
}

/// CouchDB's order of JSON values: null, false, true, numbers, strings,
/// arrays (element by element), objects (member by member, in order).
/// Strings compare by code point, not by ICU collation as in CouchDB.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i.cmp(&j),
            _ => {
                let (f, g) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                f.partial_cmp(&g).unwrap_or(Ordering::Equal)
            }
        },
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => {
            for (i, j) in x.iter().zip(y) {
                let o = compare(i, j);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => {
            for ((k1, v1), (k2, v2)) in x.iter().zip(y) {
                let o = k1.cmp(k2).then_with(|| compare(v1, v2));
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

/// `prefix`: the path of the value at hand (`None` at the document; a
/// field may be named `""`, so an empty prefix is not the top).
fn required(sel: &Selector, prefix: Option<&str>, out: &mut Vec<String>) {
    match sel {
        Selector::And(xs) => xs.iter().for_each(|x| required(x, prefix, out)),
        Selector::Or(xs) if !xs.is_empty() => {
            // A field every branch requires.
            let mut each: Vec<Vec<String>> = Vec::new();
            for x in xs {
                let mut f = Vec::new();
                required(x, prefix, &mut f);
                each.push(f);
            }
            if let Some((first, rest)) = each.split_first() {
                for f in first {
                    if rest.iter().all(|r| r.contains(f)) {
                        out.push(f.clone());
                    }
                }
            }
        }
        Selector::Field(path, inner) => {
            let name = join_path(prefix, path);
            // Required exactly when the condition fails on a missing value
            // (asked of the matcher itself, so the two always agree:
            // `$exists: false`, a `$not` of `$exists: true`, an `$or`
            // with either, or a nested field's do not require it).
            if !eval(inner, None, false) {
                out.push(name.clone());
                required(inner, Some(&name), out);
            }
        }
        _ => {}
    }
}

fn join_path(prefix: Option<&str>, path: &[String]) -> String {
    let own: Vec<String> = path.iter().map(|p| p.replace('.', "\\.")).collect();
    match prefix {
        None => own.join("."),
        Some(prefix) => format!("{prefix}.{}", own.join(".")),
    }
}

/// A sort or index direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Asc,
    Desc,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Asc => "asc",
            Dir::Desc => "desc",
        }
    }
}

/// `["a", {"b": "desc"}]` (a `sort`, or an index's `fields`): each field
/// with its direction.
pub fn parse_fields(v: &Value, what: &str) -> Result<Vec<(String, Dir)>, MangoError> {
    let Value::Array(items) = v else {
        return Err(MangoError::BadArg(format!("{what} must be an array")));
    };
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        match i {
            Value::String(f) if !f.is_empty() => out.push((f.clone(), Dir::Asc)),
            Value::Object(m) if m.len() == 1 => {
                let (f, d) = m
                    .iter()
                    .next()
                    .map(|(k, v)| (k.clone(), v))
                    .unwrap_or_default();
                let dir = match d.as_str() {
                    Some("asc") => Dir::Asc,
                    Some("desc") => Dir::Desc,
                    _ => {
                        return Err(MangoError::BadArg(format!(
                            "{what}: a direction is \"asc\" or \"desc\""
                        )))
                    }
                };
                out.push((f, dir));
            }
            _ => {
                return Err(MangoError::BadArg(format!(
                    "{what}: each entry is a field name or {{\"field\": \"asc\"|\"desc\"}}"
                )))
            }
        }
    }
    Ok(out)
}

/// A `sort`: its fields and its one direction.
pub fn parse_sort(v: &Value) -> Result<(Vec<String>, Dir), MangoError> {
    let f = parse_fields(v, "sort")?;
    let dir = f.first().map_or(Dir::Asc, |(_, d)| *d);
    if f.iter().any(|(_, d)| *d != dir) {
        return Err(MangoError::MixedSort);
    }
    Ok((f.into_iter().map(|(n, _)| n).collect(), dir))
}

/// `fields`: a copy of `doc` with only those fields (nested ones nested).
pub fn project(doc: &Value, fields: &[String]) -> Value {
    let mut out = Value::Object(Map::new());
    for f in fields {
        let path = split_path(f);
        let Some(v) = get_path(doc, &path) else {
            continue;
        };
        let mut cur = &mut out;
        for (i, p) in path.iter().enumerate() {
            let Value::Object(m) = cur else { break };
            if i + 1 == path.len() {
                m.insert(p.clone(), v.clone());
                break;
            }
            cur = m
                .entry(p.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    out
}

/// The sort key of a document: the values of the sort fields (a missing
/// one is null).
pub fn sort_key(doc: &Value, fields: &[String]) -> Vec<Value> {
    fields
        .iter()
        .map(|f| {
            get_path(doc, &split_path(f))
                .cloned()
                .unwrap_or(Value::Null)
        })
        .collect()
}

/// Orders two (key, id) rows, the id breaking ties.
pub fn compare_rows(a: &(Vec<Value>, String), b: &(Vec<Value>, String)) -> Ordering {
    compare(&Value::Array(a.0.clone()), &Value::Array(b.0.clone())).then_with(|| a.1.cmp(&b.1))
}

/// A json index as kept in a design document (`language: "query"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// `_design/<name>`.
    pub ddoc: String,
    pub name: String,
    pub fields: Vec<(String, Dir)>,
}

impl Index {
    /// The indexes a design document holds (none unless its language is `query`).
    pub fn of_ddoc(id: &str, doc: &Map<String, Value>) -> Vec<Index> {
        if doc.get("language").and_then(Value::as_str) != Some("query") {
            return Vec::new();
        }
        let Some(views) = doc.get("views").and_then(Value::as_object) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, v) in views {
            let Some(fields) = v
                .get("map")
                .and_then(|m| m.get("fields"))
                .and_then(Value::as_object)
            else {
                continue;
            };
            let fields = fields
                .iter()
                .map(|(f, d)| {
                    let dir = if d.as_str() == Some("desc") {
                        Dir::Desc
                    } else {
                        Dir::Asc
                    };
                    (f.clone(), dir)
                })
                .collect();
            out.push(Index {
                ddoc: id.to_owned(),
                name: name.clone(),
                fields,
            });
        }
        out
    }

    /// The index's entry in a design document's `views`.
    pub fn view(&self) -> Value {
        let mut fields = Map::new();
        for (f, d) in &self.fields {
            fields.insert(f.clone(), Value::String(d.name().into()));
        }
        let def: Vec<Value> = self
            .fields
            .iter()
            .map(|(f, _)| Value::String(f.clone()))
            .collect();
        serde_json::json!({
            "map": {"fields": fields, "partial_filter_selector": {}},
            "reduce": "_count",
            "options": {"def": {"fields": def}},
        })
    }

    /// As `GET _index` lists it.
    pub fn describe(&self) -> Value {
        let fields: Vec<Value> = self
            .fields
            .iter()
            .map(|(f, d)| serde_json::json!({ f.clone(): d.name() }))
            .collect();
        serde_json::json!({
            "ddoc": self.ddoc, "name": self.name, "type": "json",
            "partitioned": false, "def": {"fields": fields},
        })
    }

    /// Whether it can give `sort`: the sort fields are the first fields
    /// of the index.
    pub fn sorts(&self, sort: &[String]) -> bool {
        sort.len() <= self.fields.len() && sort.iter().zip(&self.fields).all(|(s, (f, _))| s == f)
    }

    /// Whether a document is in the index: it has every indexed field.
    pub fn covers(&self, doc: &Value) -> bool {
        self.fields
            .iter()
            .all(|(f, _)| get_path(doc, &split_path(f)).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(sel: Value, doc: Value) -> bool {
        Selector::parse(&sel).unwrap().matches(&doc)
    }

    #[test]
    fn implicit_equality_nested_fields_and_comparisons() {
        let d = json!({"_id": "x", "a": 3, "b": {"c": "hi", "d.e": 1}, "l": [1, 2, 3]});
        assert!(m(json!({"a": 3}), d.clone()));
        assert!(!m(json!({"a": 4}), d.clone()));
        assert!(m(json!({"a": 3.0}), d.clone()), "numbers compare by value");
        assert!(m(json!({"b.c": "hi"}), d.clone()));
        assert!(
            m(json!({"b": {"c": "hi"}}), d.clone()),
            "nested object is a path"
        );
        assert!(m(json!({"b.d\\.e": 1}), d.clone()), "escaped dot");
        assert!(m(json!({"l.1": 2}), d.clone()), "array index in a path");
        assert!(m(json!({"l": [1, 2, 3]}), d.clone()));
        assert!(m(json!({"a": {"$gt": 2, "$lte": 3}}), d.clone()));
        assert!(!m(json!({"a": {"$gt": 3}}), d.clone()));
        assert!(m(json!({"a": {"$gte": 3, "$lt": 4, "$ne": 5}}), d.clone()));
        assert!(!m(json!({"a": {"$lt": 3}}), d.clone()));
        // Numbers sort before strings, strings before arrays and objects.
        assert!(m(json!({"a": {"$lt": "0"}}), d.clone()));
        assert!(m(json!({"b.c": {"$gt": 1000}}), d.clone()));
        assert!(m(json!({}), d.clone()), "empty selector matches all");
        assert!(m(json!({"_id": "x"}), d));
    }

    #[test]
    fn a_missing_field_fails_every_condition_but_exists_false() {
        let d = json!({"a": 1});
        assert!(!m(json!({"z": {"$ne": 1}}), d.clone()));
        assert!(!m(json!({"z": {"$nin": [1]}}), d.clone()));
        assert!(m(json!({"z": {"$exists": false}}), d.clone()));
        assert!(!m(json!({"a": {"$exists": false}}), d.clone()));
        assert!(m(json!({"a": {"$exists": true}}), d.clone()));
        // Negation pushed to the field still needs the field...
        assert!(!m(json!({"$not": {"z": 1}}), d.clone()));
        assert!(!m(json!({"z": {"$not": {"$eq": 1}}}), d.clone()));
        // ...but negated `$exists` flips.
        assert!(m(json!({"$not": {"z": {"$exists": true}}}), d.clone()));
        assert!(m(json!({"$not": {"a": 2}}), d.clone()));
        assert!(!m(json!({"$not": {"a": 1}}), d));
    }

    #[test]
    fn combinators_and_list_operators() {
        let d = json!({"a": 1, "tags": ["x", "y"], "s": "Hello", "n": 7});
        assert!(m(json!({"$or": [{"a": 2}, {"a": 1}]}), d.clone()));
        assert!(!m(json!({"$or": [{"a": 2}, {"a": 3}]}), d.clone()));
        assert!(m(json!({"$and": [{"a": 1}, {"n": 7}]}), d.clone()));
        assert!(!m(json!({"$and": [{"a": 1}, {"n": 8}]}), d.clone()));
        assert!(m(json!({"$nor": [{"a": 2}, {"a": 3}]}), d.clone()));
        assert!(!m(json!({"$nor": [{"a": 1}, {"a": 3}]}), d.clone()));
        assert!(m(json!({"a": {"$in": [0, 1]}}), d.clone()));
        assert!(!m(json!({"a": {"$in": []}}), d.clone()));
        assert!(
            m(json!({"tags": {"$in": ["y", "z"]}}), d.clone()),
            "array has one"
        );
        assert!(m(json!({"a": {"$nin": [2, 3]}}), d.clone()));
        assert!(!m(json!({"tags": {"$nin": ["y"]}}), d.clone()));
        assert!(m(json!({"tags": {"$all": ["y", "x"]}}), d.clone()));
        assert!(!m(json!({"tags": {"$all": ["y", "q"]}}), d.clone()));
        assert!(m(json!({"tags": {"$size": 2}}), d.clone()));
        assert!(!m(json!({"a": {"$size": 1}}), d.clone()));
        assert!(m(json!({"tags": {"$elemMatch": {"$eq": "y"}}}), d.clone()));
        assert!(!m(json!({"tags": {"$elemMatch": {"$eq": "q"}}}), d.clone()));
        assert!(m(json!({"n": {"$mod": [4, 3]}}), d.clone()));
        assert!(!m(json!({"n": {"$mod": [4, 2]}}), d.clone()));
        assert!(m(json!({"s": {"$regex": "^H.l+o$"}}), d.clone()));
        assert!(!m(json!({"s": {"$regex": "^h"}}), d.clone()));
        assert!(
            !m(json!({"a": {"$regex": "1"}}), d.clone()),
            "regex only on strings"
        );
        assert!(m(
            json!({"tags": {"$type": "array"}, "s": {"$type": "string"}}),
            d.clone()
        ));
        assert!(!m(json!({"a": {"$type": "string"}}), d.clone()));
        let people = json!({"p": [{"name": "ann", "age": 30}, {"name": "bo", "age": 9}]});
        assert!(m(
            json!({"p": {"$elemMatch": {"name": "bo", "age": {"$lt": 10}}}}),
            people.clone()
        ));
        assert!(!m(
            json!({"p": {"$elemMatch": {"name": "ann", "age": {"$lt": 10}}}}),
            people.clone()
        ));
        assert!(m(
            json!({"p": {"$allMatch": {"age": {"$gt": 1}}}}),
            people.clone()
        ));
        assert!(!m(
            json!({"p": {"$allMatch": {"age": {"$gt": 10}}}}),
            people
        ));
    }

    fn reason(s: Value) -> String {
        match Selector::parse(&s) {
            Err(MangoError::BadArg(r)) => r,
            other => panic!("expected a bad argument, got {other:?}"),
        }
    }

    #[test]
    fn a_costly_regex_is_refused_quickly_as_too_complex() {
        // 200 copies of Unicode's word class: about 1 s and 8 MB to compile
        // with the engine's default limit.
        for p in [r"\w{200}", r"(?:\w{50}){50}", r"[\p{L}\p{N}]{1000}"] {
            let started = std::time::Instant::now();
            let r = reason(json!({"s": {"$regex": p}}));
            assert!(r.contains("$regex too complex"), "{p}: {r}");
            // Refused as soon as it passes the limit, not after compiling
            // it all (generous for a slow debug build on a busy machine).
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "{p} took {:?}",
                started.elapsed()
            );
        }
        // A syntax error is still reported as one.
        let r = reason(json!({"s": {"$regex": "("}}));
        assert!(
            r.starts_with("$regex: ") && !r.contains("too complex"),
            "{r}"
        );
    }

    #[test]
    fn ordinary_regexes_still_compile_and_match() {
        let d = json!({"s": "Hello wörld", "e": "ann@example.org", "n": "2024-06-01"});
        assert!(m(json!({"s": {"$regex": r"^\w+ \w+$"}}), d.clone()));
        assert!(m(
            json!({"s": {"$regex": r"(?i)^hello W\w{4}$"}}),
            d.clone()
        ));
        assert!(m(
            json!({"e": {"$regex": r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$"}}),
            d.clone()
        ));
        assert!(m(
            json!({"n": {"$regex": r"^\d{4}-\d{2}-\d{2}$"}}),
            d.clone()
        ));
        assert!(m(json!({"s": {"$regex": r"^\w{5} w"}}), d.clone()));
        assert!(!m(json!({"s": {"$regex": r"^\w{4}$"}}), d.clone()));
        // Unicode classes repeated a little are within the limit too.
        assert!(!m(json!({"s": {"$regex": r"^\w{20}$"}}), d.clone()));
        // ASCII classes are small: long repetitions of them stay in bounds.
        assert!(m(
            json!({"e": {"$regex": r"^(?-u:\w){3}@[a-z]{7}\.(?-u:\w){3}$|(?-u:\w){200}"}}),
            d.clone()
        ));
        assert!(!m(json!({"s": {"$regex": r"[0-9A-Za-z_]{200}"}}), d));
    }

    #[test]
    fn required_fields_are_only_those_no_matching_document_lacks() {
        let req = |v: Value| Selector::parse(&v).unwrap().required_fields();
        for sel in [
            json!({"_idted": {"$exists": false}}),
            json!({"a": {"b": {"$exists": false}}}),
            json!({"exif": {"$not": {"$exists": true}}}),
            json!({"z": {"$or": [{"$exists": false}, {"$eq": 1}]}}),
        ] {
            assert!(req(sel.clone()).is_empty(), "{sel}");
            // And a document without the field matches it.
            let s = Selector::parse(&sel).unwrap();
            assert!(s.matches(&json!({"_id": "bare"})), "{sel}");
        }
        assert_eq!(req(json!({"a": {"b": 1}})), vec!["a", "a.b"]);
        // A field named "" is a field like any other.
        assert_eq!(req(json!({"": {"size": {"$gt": 0}}})), vec!["", ".size"]);
        assert_eq!(
            req(json!({"n": {"$gt": 1}, "m": {"$exists": false}})),
            vec!["n"]
        );
    }

    #[test]
    fn mod_of_the_smallest_integer_by_minus_one_is_no_panic() {
        let s = Selector::parse(&json!({"n": {"$mod": [-1, 0]}})).unwrap();
        // `%` would panic here; the remainder is 0.
        assert!(s.matches(&json!({"n": i64::MIN})));
        assert!(s.matches(&json!({"n": 6})));
        let s = Selector::parse(&json!({"n": {"$mod": [-1, 1]}})).unwrap();
        assert!(!s.matches(&json!({"n": i64::MIN})));
    }

    #[test]
    fn a_selector_holds_at_most_eight_regexes() {
        let with = |n: usize| {
            let parts: Vec<Value> = (0..n)
                .map(|i| json!({format!("f{i}"): {"$regex": "^a"}}))
                .collect();
            json!({"$or": parts})
        };
        let eight = Selector::parse(&with(MAX_REGEXES)).unwrap();
        assert!(eight.matches(&json!({"f7": "abc"})));
        let r = reason(with(MAX_REGEXES + 1));
        assert!(r.contains("at most 8 $regex"), "{r}");
        // Counted across the whole tree, nested and negated ones included.
        let mut nested = json!({"a": {"$regex": "x"}});
        for i in 0..MAX_REGEXES {
            nested = json!({"$not": nested, format!("b{i}"): {"$regex": "y"}});
        }
        assert!(reason(nested).contains("at most 8 $regex"));
    }

    #[test]
    fn bad_selectors_are_refused_with_the_operator_named() {
        let e = |s: Value| Selector::parse(&s).unwrap_err();
        assert_eq!(
            e(json!({"a": {"$foo": 1}})),
            MangoError::InvalidOperator("$foo".into())
        );
        assert!(matches!(
            e(json!({"a": {"$regex": "("}})),
            MangoError::BadArg(_)
        ));
        assert!(matches!(
            e(json!({"a": {"$mod": [0, 1]}})),
            MangoError::BadArg(_)
        ));
        assert!(matches!(e(json!({"$or": {"a": 1}})), MangoError::BadArg(_)));
        assert!(matches!(
            e(json!({"a": {"$type": "date"}})),
            MangoError::BadArg(_)
        ));
        assert!(matches!(e(json!([1])), MangoError::BadArg(_)));
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!({"$not": deep});
        }
        let mut deep2 = json!({"a": 1});
        for _ in 0..200 {
            deep2 = json!({"$not": deep2});
        }
        assert!(Selector::parse(&deep).is_err());
        assert!(matches!(
            Selector::parse(&deep2),
            Err(MangoError::BadArg(_))
        ));
    }

    /// A small deterministic generator (no crate for it).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }

        fn value(&mut self) -> Value {
            match self.next(6) {
                0 => json!(null),
                1 => json!(self.next(2) == 0),
                2 => json!(self.next(5) as i64 - 2),
                3 => json!(["a", "b", "c"][self.next(3) as usize]),
                4 => json!([self.next(3), self.next(3)]),
                _ => json!({"k": self.next(3)}),
            }
        }

        /// An argument: any value but an object (an object there is a
        /// nested path, not an equality, as in CouchDB).
        fn arg(&mut self) -> Value {
            match self.value() {
                Value::Object(_) => json!([self.next(3)]),
                v => v,
            }
        }

        /// A selector on fields `f0`..`f2` (which the documents all have).
        fn selector(&mut self, depth: u32) -> Value {
            let field = format!("f{}", self.next(3));
            let pick = if depth == 0 {
                4 + self.next(9)
            } else {
                self.next(13)
            };
            match pick {
                0 => json!({"$and": [self.selector(depth - 1), self.selector(depth - 1)]}),
                1 => json!({"$or": [self.selector(depth - 1), self.selector(depth - 1)]}),
                2 => json!({"$nor": [self.selector(depth - 1), self.selector(depth - 1)]}),
                3 => json!({"$not": self.selector(depth - 1)}),
                4 => json!({ field: self.arg() }),
                5 => json!({ field: {"$gt": self.arg()} }),
                6 => json!({ field: {"$lte": self.arg()} }),
                7 => json!({ field: {"$ne": self.arg()} }),
                8 => json!({ field: {"$in": [self.arg(), self.arg()]} }),
                9 => json!({ field: {"$nin": [self.arg()]} }),
                10 => json!({ field: {"$exists": self.next(2) == 0} }),
                11 => json!({ field: {"$type": "number"} }),
                _ => json!({ field: {"$size": self.next(3)} }),
            }
        }
    }

    /// A model of the rules for documents that have every field: plain
    /// boolean logic, comparisons by [`compare`].
    fn model(sel: &Value, doc: &Value) -> bool {
        let m = sel.as_object().unwrap();
        m.iter().all(|(k, v)| match k.as_str() {
            "$and" => v.as_array().unwrap().iter().all(|s| model(s, doc)),
            "$or" => v.as_array().unwrap().iter().any(|s| model(s, doc)),
            "$nor" => !v.as_array().unwrap().iter().any(|s| model(s, doc)),
            "$not" => !model(v, doc),
            f => {
                let x = &doc[f];
                let eq = |a: &Value| compare(x, a) == Ordering::Equal;
                let (op, arg) = match v.as_object() {
                    Some(o) if o.keys().all(|k| k.starts_with('$')) && !o.is_empty() => {
                        o.iter().next().map(|(a, b)| (a.as_str(), b)).unwrap()
                    }
                    _ => ("$eq", v),
                };
                let any_in = |args: &Value| {
                    let args = args.as_array().unwrap();
                    match x {
                        Value::Array(items) => args
                            .iter()
                            .any(|a| items.iter().any(|i| compare(i, a).is_eq())),
                        _ => args.iter().any(eq),
                    }
                };
                match op {
                    "$eq" => eq(arg),
                    "$gt" => compare(x, arg).is_gt(),
                    "$lte" => compare(x, arg).is_le(),
                    "$ne" => !eq(arg),
                    "$in" => any_in(arg),
                    "$nin" => !any_in(arg),
                    "$exists" => arg.as_bool().unwrap(),
                    "$type" => type_name(x) == arg.as_str().unwrap(),
                    "$size" => x
                        .as_array()
                        .is_some_and(|a| a.len() as u64 == arg.as_u64().unwrap()),
                    _ => unreachable!("{op}"),
                }
            }
        })
    }

    #[test]
    fn selectors_agree_with_a_boolean_model_on_documents_with_every_field() {
        let mut r = Lcg(7);
        let mut matched = 0;
        for _ in 0..3000 {
            let doc = json!({"f0": r.value(), "f1": r.value(), "f2": r.value()});
            let sel = r.selector(3);
            let parsed = Selector::parse(&sel).unwrap();
            assert_eq!(parsed.matches(&doc), model(&sel, &doc), "{sel} on {doc}");
            matched += usize::from(model(&sel, &doc));
            let not = Selector::parse(&json!({"$not": sel})).unwrap();
            assert_eq!(not.matches(&doc), !model(&sel, &doc), "$not {sel} on {doc}");
        }
        // Both answers come up often: the cases are not all one way.
        assert!((300..2700).contains(&matched), "{matched} of 3000 matched");
    }

    #[test]
    fn values_order_like_couchdb() {
        let order = [
            json!(null),
            json!(false),
            json!(true),
            json!(-1),
            json!(2.5),
            json!(10),
            json!("A"),
            json!("a"),
            json!("b"),
            json!([]),
            json!([1]),
            json!([1, 2]),
            json!({}),
            json!({"a": 1}),
        ];
        for (i, a) in order.iter().enumerate() {
            for (j, b) in order.iter().enumerate() {
                assert_eq!(compare(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn fields_project_sorts_parse_and_required_fields_are_found() {
        let d = json!({"_id": "x", "a": 1, "b": {"c": 2, "d": 3}});
        assert_eq!(
            project(&d, &["_id".into(), "b.c".into(), "zz".into()]),
            json!({"_id": "x", "b": {"c": 2}})
        );
        assert_eq!(
            parse_sort(&json!(["a", {"b": "asc"}])).unwrap(),
            (vec!["a".into(), "b".into()], Dir::Asc)
        );
        assert_eq!(parse_sort(&json!([{"a": "desc"}])).unwrap().1, Dir::Desc);
        assert_eq!(
            parse_sort(&json!(["a", {"b": "desc"}])),
            Err(MangoError::MixedSort)
        );
        let s = Selector::parse(
            &json!({"a": 1, "b": {"c": {"$gt": 1}}, "z": {"$exists": false},
            "$or": [{"q": 1, "r": 1}, {"q": 2}]}),
        )
        .unwrap();
        assert_eq!(s.required_fields(), vec!["a", "b", "b.c", "q"]);
        assert_eq!(
            sort_key(&d, &["b.d".into(), "no".into()]),
            vec![json!(3), json!(null)]
        );
    }

    #[test]
    fn an_index_sorts_by_its_leading_fields_and_covers_documents_with_them() {
        let i = Index {
            ddoc: "_design/i".into(),
            name: "n".into(),
            fields: vec![("a".into(), Dir::Asc), ("b".into(), Dir::Asc)],
        };
        assert!(i.sorts(&["a".into()]));
        assert!(i.sorts(&["a".into(), "b".into()]));
        assert!(!i.sorts(&["b".into()]));
        assert!(i.covers(&json!({"a": 1, "b": null})));
        assert!(!i.covers(&json!({"a": 1})));
        let mut ddoc = Map::new();
        ddoc.insert("language".into(), json!("query"));
        ddoc.insert("views".into(), json!({"n": i.view()}));
        assert_eq!(Index::of_ddoc("_design/i", &ddoc), vec![i.clone()]);
        ddoc.insert("language".into(), json!("javascript"));
        assert!(Index::of_ddoc("_design/i", &ddoc).is_empty());
    }
}
