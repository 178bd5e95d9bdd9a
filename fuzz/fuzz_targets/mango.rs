//! Mango (`cloudlet_sync::mango`): the selector of any paired client's
//! `_find` or `_changes?filter=_selector` body, parsed and then matched
//! against each document. Input that is JSON is taken as a selector, and as
//! a `_find` body (its selector, `sort` and `fields`), an `_index` body
//! (`index.fields`) and a design document (its json indexes); selectors are
//! matched against a few fixed documents and against the input itself.
//!
//! Never panics, and:
//! * a selector and its `$not` never both match a document (negation goes
//!   down to the fields: on a missing field both fail, but never both hold);
//! * a document a selector matches has every field of `required_fields`
//!   (a `_find` without sort reads only an index on such fields);
//! * `compare`, CouchDB's order of values, is antisymmetric, and so is
//!   `compare_rows` on sort keys;
//! * `fields` keeps every field asked for that a document has, as it is.
#![no_main]

use std::cmp::Ordering;
use std::sync::OnceLock;

use cloudlet_sync::mango::{self, compare, get_path, split_path, Index, Selector};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// Documents as a client stores them, and one of edge values.
fn documents() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| {
        vec![
            json!({
                "_id": "photo-1", "_rev": "1-9f0c", "type": "photo", "name": "Hello",
                "size": 2048, "ratio": 1.5, "tags": ["x", "y"], "a.b": true,
                "exif": {"camera": "fz", "iso": 200, "gps": null},
                "people": [{"name": "ann", "age": 30}, {"name": "bo", "age": 9}],
            }),
            json!({
                "_id": "edge", "n": i64::MIN, "m": u64::MAX, "f": -1.0e300, "z": 0,
                "s": "", "l": [], "o": {}, "deep": [[1, [2]], {"k": [null, false]}],
            }),
            json!({"_id": "bare"}),
        ]
    })
}

fn check_selector(v: &Value, input: &Value) {
    let Ok(sel) = Selector::parse(v) else {
        return;
    };
    // One level deeper: refused when `v` is at the depth limit.
    let not = Selector::parse(&json!({ "$not": v })).ok();
    let required = sel.required_fields();
    for doc in documents().iter().chain([input]) {
        let m = sel.matches(doc);
        if let Some(not) = &not {
            assert!(
                !(m && not.matches(doc)),
                "{v} and its $not both match {doc}"
            );
        }
        if m {
            for f in &required {
                assert!(
                    get_path(doc, &split_path(f)).is_some(),
                    "{doc} matches {v} but has not its required field {f:?}"
                );
            }
        }
    }
}

fn id(doc: &Value) -> String {
    doc.get("_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    check_selector(&input, &input);

    assert_eq!(compare(&input, &input), Ordering::Equal, "{input}");
    for doc in documents() {
        assert_eq!(
            compare(&input, doc),
            compare(doc, &input).reverse(),
            "{input} vs {doc}"
        );
    }

    let Value::Object(body) = &input else {
        return;
    };
    if let Some(sel) = body.get("selector") {
        check_selector(sel, &input);
    }
    let sort = match body.get("sort").map(mango::parse_sort) {
        Some(Ok((sort, _dir))) => {
            let rows: Vec<(Vec<Value>, String)> = documents()
                .iter()
                .chain([&input])
                .map(|d| (mango::sort_key(d, &sort), id(d)))
                .collect();
            for a in &rows {
                for b in &rows {
                    assert_eq!(
                        mango::compare_rows(a, b),
                        mango::compare_rows(b, a).reverse(),
                        "{a:?} vs {b:?}"
                    );
                }
            }
            sort
        }
        _ => Vec::new(),
    };
    if let Some(Value::Array(fields)) = body.get("fields") {
        let fields: Vec<String> = fields
            .iter()
            .filter_map(|f| f.as_str().map(str::to_owned))
            .collect();
        for doc in documents().iter().chain([&input]) {
            let shown = mango::project(doc, &fields);
            for f in &fields {
                let path = split_path(f);
                if let Some(want) = get_path(doc, &path) {
                    assert_eq!(get_path(&shown, &path), Some(want), "{f:?} of {doc}");
                }
            }
        }
    }
    if let Some(fields) = body.get("index").and_then(|i| i.get("fields")) {
        let _ = mango::parse_fields(fields, "index.fields");
    }
    for index in Index::of_ddoc("_design/fuzz", body) {
        let _ = (index.view(), index.describe(), index.sorts(&sort));
        for doc in documents().iter().chain([&input]) {
            let _ = index.covers(doc);
        }
    }
});
