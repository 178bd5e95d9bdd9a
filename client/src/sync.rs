//! `cloudlet sync`: the replications a box's sync service runs, and the web
//! origins that may call it from a browser.
//!
//! Replications are documents of the box's `_replicator` database, as in
//! CouchDB (`source`, `target`, `continuous`, `create_target`), so a
//! CouchDB tool sees the same list; their state is CouchDB's
//! `/_scheduler/docs`. This command only reads and writes those, over the
//! pinned HTTPS every `cloudlet` call uses (port 5984 on the box's host).

use serde_json::{json, Value};

use crate::remote;

/// Where a command finds the box's sync service.
pub struct At<'a> {
    pub box_id: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
}

impl At<'_> {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        remote::call_service(self.box_id, self.host, Some(self.port), method, path, body).await
    }
}

/// A path segment: everything but unreserved characters percent-encoded.
fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// An endpoint as it may be shown: a URL loses its user name and password.
pub fn shown(endpoint: &str) -> String {
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return endpoint.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

/// The id `add` gives a replication when none is asked for: where it goes
/// from and to, in characters a document id keeps readable.
pub fn default_id(source: &str, target: &str) -> String {
    let clean = |s: &str| -> String {
        let s = shown(s);
        let s = s
            .split_once("://")
            .map_or(s.as_str(), |(_, r)| r)
            .to_owned();
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .split('-')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("-")
    };
    let id = format!("{}-to-{}", clean(source), clean(target));
    id.chars().take(120).collect()
}

/// One replication as `add` writes it.
pub fn replication_doc(source: &str, target: &str, continuous: bool, create_target: bool) -> Value {
    json!({
        "source": source,
        "target": target,
        "continuous": continuous,
        "create_target": create_target,
    })
}

/// The `/_scheduler/docs` entries by document id.
async fn states(at: &At<'_>) -> Result<std::collections::BTreeMap<String, Value>, String> {
    let s = at.call("GET", "/_scheduler/docs", None).await?;
    Ok(s["docs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d["doc_id"].as_str()?.to_owned(), d.clone())))
        .collect())
}

/// One line of `list`: the id, where from and to, how, and the state.
pub fn line(id: &str, doc: &Value, state: Option<&Value>) -> String {
    let how = if doc["continuous"].as_bool() == Some(true) {
        "continuous"
    } else {
        "once"
    };
    let mut out = format!(
        "{id}  {} -> {}  {how}",
        shown(doc["source"].as_str().unwrap_or("?")),
        shown(doc["target"].as_str().unwrap_or("?")),
    );
    match state {
        Some(s) => {
            out.push_str(&format!(
                "  {}  {} written",
                s["state"].as_str().unwrap_or("?"),
                s["info"]["docs_written"].as_u64().unwrap_or(0)
            ));
            if let Some(pending) = s["info"]["changes_pending"].as_u64() {
                out.push_str(&format!(", {pending} pending"));
            }
            if let Some(e) = s["last_error"]
                .as_str()
                .or_else(|| s["info"]["error"].as_str())
            {
                out.push_str(&format!("  error: {e}"));
            }
        }
        None => out.push_str("  (not started)"),
    }
    out
}

pub async fn list(at: &At<'_>) -> Result<(), String> {
    let all = at
        .call("GET", "/_replicator/_all_docs?include_docs=true", None)
        .await?;
    let states = states(at).await?;
    let rows: Vec<&Value> = all["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| !r["id"].as_str().unwrap_or("").starts_with("_design/"))
        .collect();
    if rows.is_empty() {
        println!("no replications: add one with `cloudlet sync add SOURCE TARGET`");
    }
    for r in rows {
        let id = r["id"].as_str().unwrap_or("?");
        println!("{}", line(id, &r["doc"], states.get(id)));
    }
    Ok(())
}

pub async fn add(
    at: &At<'_>,
    source: &str,
    target: &str,
    id: Option<&str>,
    continuous: bool,
    create_target: bool,
) -> Result<String, String> {
    let id = id.map_or_else(|| default_id(source, target), str::to_owned);
    if id.is_empty() || id.starts_with('_') {
        return Err(format!(
            "{id:?} cannot name a replication: give a name with --id (not starting with _)"
        ));
    }
    let doc = replication_doc(source, target, continuous, create_target);
    at.call("PUT", &format!("/_replicator/{}", seg(&id)), Some(doc))
        .await
        .map_err(|e| {
            if e.contains("conflict") || e.contains("Document update conflict") {
                format!("a replication {id} exists already: remove it first, or pick another --id")
            } else {
                e
            }
        })?;
    Ok(format!(
        "added {id}: {} -> {} ({})",
        shown(source),
        shown(target),
        if continuous { "continuous" } else { "once" }
    ))
}

pub async fn remove(at: &At<'_>, id: &str) -> Result<String, String> {
    let path = format!("/_replicator/{}", seg(id));
    let doc = at.call("GET", &path, None).await.map_err(|e| {
        if e == "missing" || e == "deleted" {
            format!("no replication {id}: `cloudlet sync list` shows them")
        } else {
            e
        }
    })?;
    let rev = doc["_rev"].as_str().unwrap_or_default();
    at.call("DELETE", &format!("{path}?rev={}", seg(rev)), None)
        .await?;
    Ok(format!("removed {id}: it stops replicating"))
}

pub async fn state(at: &At<'_>, id: Option<&str>) -> Result<(), String> {
    let states = states(at).await?;
    let chosen: Vec<(&String, &Value)> = match id {
        Some(id) => match states.get_key_value(id) {
            Some(kv) => vec![kv],
            None => return Err(format!("no replication {id} is known to the scheduler")),
        },
        None => states.iter().collect(),
    };
    if chosen.is_empty() {
        println!("no replications");
    }
    for (id, s) in chosen {
        println!("{id}");
        println!("  from   {}", shown(s["source"].as_str().unwrap_or("?")));
        println!("  to     {}", shown(s["target"].as_str().unwrap_or("?")));
        println!("  state  {}", s["state"].as_str().unwrap_or("?"));
        let info = &s["info"];
        for k in [
            "docs_read",
            "docs_written",
            "doc_write_failures",
            "changes_pending",
            "checkpointed_source_seq",
        ] {
            if !info[k].is_null() {
                println!("  {:<24} {}", k, info[k]);
            }
        }
        for k in ["error_count", "start_time", "last_updated", "last_error"] {
            if !s[k].is_null() {
                println!(
                    "  {:<24} {}",
                    k,
                    s[k].as_str()
                        .map_or_else(|| s[k].to_string(), str::to_owned)
                );
            }
        }
    }
    Ok(())
}

/// One line for `cloudlet status`: how many replications, by state.
pub fn summarize(states: &[Value]) -> String {
    if states.is_empty() {
        return "no replications".into();
    }
    let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
    for s in states {
        *by.entry(s["state"].as_str().unwrap_or("unknown"))
            .or_default() += 1;
    }
    let parts: Vec<String> = by.iter().map(|(k, n)| format!("{n} {k}")).collect();
    format!(
        "{} replication{}: {}",
        states.len(),
        if states.len() == 1 { "" } else { "s" },
        parts.join(", ")
    )
}

/// The box's replications in one line (see [`summarize`]).
pub async fn summary(at: &At<'_>) -> Result<String, String> {
    let states: Vec<Value> = states(at).await?.into_values().collect();
    Ok(summarize(&states))
}

/// The origins besides the box's own web UI that may call the sync
/// service from a browser.
pub async fn cors_origins(at: &At<'_>) -> Result<Vec<String>, String> {
    let c = at.call("GET", "/_cloudlet/cors", None).await?;
    Ok(c["origins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str().map(str::to_owned))
        .collect())
}

/// Sets the origins (owners only; the box checks).
pub async fn set_cors_origins(at: &At<'_>, origins: &[String]) -> Result<(), String> {
    at.call(
        "PUT",
        "/_cloudlet/cors",
        Some(json!({ "origins": origins })),
    )
    .await?;
    Ok(())
}

/// What an origin must look like: `scheme://host[:port]`, nothing after.
pub fn check_origin(o: &str) -> Result<(), String> {
    let ok = o.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{o:?} is not an origin: write it as https://host or http://host:port, with no path"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_endpoints_never_carry_a_password() {
        assert_eq!(
            shown("https://me:secret@box.local:5984/notes"),
            "https://box.local:5984/notes"
        );
        assert_eq!(shown("http://a:b@[::1]:5984/x"), "http://[::1]:5984/x");
        assert_eq!(shown("notes"), "notes");
        assert_eq!(
            shown("box:abcd-efgh-ijkl-mnop/notes"),
            "box:abcd-efgh-ijkl-mnop/notes"
        );
    }

    #[test]
    fn the_default_id_names_both_ends_without_credentials() {
        let id = default_id("notes", "https://me:secret@box.local:5984/notes");
        assert_eq!(id, "notes-to-box-local-5984-notes");
        assert!(!id.contains("secret"));
    }

    #[test]
    fn a_replication_doc_has_couchdbs_fields() {
        let d = replication_doc("a", "http://h/b", true, false);
        assert_eq!(d["source"], "a");
        assert_eq!(d["target"], "http://h/b");
        assert_eq!(d["continuous"], true);
        assert_eq!(d["create_target"], false);
    }

    #[test]
    fn a_list_line_shows_state_counts_and_the_error() {
        let doc = json!({"source": "a", "target": "http://u:p@h/b", "continuous": true});
        let st = json!({"state": "crashing", "info": {"docs_written": 7, "changes_pending": 3}, "last_error": "peer down"});
        assert_eq!(
            line("r1", &doc, Some(&st)),
            "r1  a -> http://h/b  continuous  crashing  7 written, 3 pending  error: peer down"
        );
        assert_eq!(
            line("r2", &doc, None),
            "r2  a -> http://h/b  continuous  (not started)"
        );
    }

    #[test]
    fn the_status_line_counts_replications_by_state() {
        assert_eq!(summarize(&[]), "no replications");
        let st = |s: &str| json!({"state": s});
        assert_eq!(
            summarize(&[st("running"), st("crashing"), st("running")]),
            "3 replications: 1 crashing, 2 running"
        );
        assert_eq!(summarize(&[st("completed")]), "1 replication: 1 completed");
    }

    #[test]
    fn origins_are_checked_before_they_are_sent() {
        assert!(check_origin("https://app.example").is_ok());
        assert!(check_origin("http://127.0.0.1:5173").is_ok());
        assert!(check_origin("https://app.example/path").is_err());
        assert!(check_origin("ftp://x").is_err());
        assert!(check_origin("app.example").is_err());
    }

    #[test]
    fn ids_with_slashes_are_one_path_segment() {
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
        assert_eq!(seg("notes-to-x_1.2~"), "notes-to-x_1.2~");
    }
}
