//! A document's revision tree, as CouchDB keeps it.
//!
//! Revisions are `N-hash`: `N` is the generation (the root is 1) and the
//! hash names the edit. The tree is kept flat, each revision pointing at
//! its parent, so merging a replicated path is inserting the revisions not
//! yet known. A revision whose ancestors were stemmed away (or never sent)
//! has no parent: the tree may have several roots.
//!
//! Only leaves keep a body: once a revision has a child its body is
//! dropped (CouchDB drops it at compaction; replication never asks for it).
//!
//! The winner among the leaves is deterministic, so every replica picks the
//! same one: a live leaf beats a deleted one, then the higher generation,
//! then the higher hash compared as a string. The other leaves are
//! conflicts and are kept until a client deletes them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A parsed revision id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rev {
    pub generation: u64,
    pub hash: String,
}

impl Rev {
    /// Parses `N-hash` (N >= 1, a non-empty hash); `None` when it is not one.
    pub fn parse(s: &str) -> Option<Rev> {
        let (n, hash) = s.split_once('-')?;
        let generation: u64 = n.parse().ok()?;
        if generation == 0 || hash.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Rev {
            generation,
            hash: hash.to_owned(),
        })
    }
}

/// The generation of a revision already known to be well formed (0 if not).
pub fn generation(rev: &str) -> u64 {
    Rev::parse(rev).map_or(0, |r| r.generation)
}

fn hash_part(rev: &str) -> &str {
    rev.split_once('-').map_or(rev, |(_, h)| h)
}

/// One revision of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The document's fields at this revision (leaves only), without
    /// `_id`/`_rev`/`_deleted`; `_attachments` holds stubs with digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Map<String, Value>>,
}

/// All revisions of one document that are kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RevTree {
    pub nodes: BTreeMap<String, Node>,
}

/// The order that picks the winner: greater wins.
fn rank(rev: &str, node: &Node) -> (bool, u64, String) {
    (!node.deleted, generation(rev), hash_part(rev).to_owned())
}

/// A new revision id for an edit of `parent` (none for a new document)
/// giving `body`: deterministic, so a retried edit gets the same id.
pub fn new_rev(parent: Option<&str>, deleted: bool, body: &Map<String, Value>) -> String {
    let mut h = Md5::new();
    h.update(parent.unwrap_or("").as_bytes());
    h.update([0, u8::from(deleted), 0]);
    h.update(serde_json::to_vec(body).unwrap_or_default());
    let g = parent.map_or(0, generation) + 1;
    format!("{g}-{}", hex::encode(h.finalize()))
}

impl RevTree {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, rev: &str) -> bool {
        self.nodes.contains_key(rev)
    }

    /// Revisions no other revision names as parent, best first.
    pub fn leaves(&self) -> Vec<&str> {
        let parents: HashSet<&str> = self
            .nodes
            .values()
            .filter_map(|n| n.parent.as_deref())
            .collect();
        let mut leaves: Vec<&str> = self
            .nodes
            .keys()
            .map(String::as_str)
            .filter(|r| !parents.contains(r))
            .collect();
        leaves.sort_by(|a, b| self.compare(b, a));
        leaves
    }

    fn compare(&self, a: &str, b: &str) -> Ordering {
        match (self.nodes.get(a), self.nodes.get(b)) {
            (Some(x), Some(y)) => rank(a, x).cmp(&rank(b, y)),
            _ => Ordering::Equal,
        }
    }

    pub fn is_leaf(&self, rev: &str) -> bool {
        self.contains(rev)
            && !self
                .nodes
                .values()
                .any(|n| n.parent.as_deref() == Some(rev))
    }

    /// The winning revision, if there is any.
    pub fn winner(&self) -> Option<&str> {
        self.leaves().into_iter().next()
    }

    pub fn node(&self, rev: &str) -> Option<&Node> {
        self.nodes.get(rev)
    }

    /// Whether the document as a whole is deleted (its winner is).
    pub fn deleted(&self) -> bool {
        self.winner()
            .and_then(|w| self.nodes.get(w))
            .is_some_and(|n| n.deleted)
    }

    /// Live leaves other than the winner, best first (`_conflicts`).
    pub fn conflicts(&self) -> Vec<&str> {
        self.leaves()
            .into_iter()
            .skip(1)
            .filter(|r| !self.nodes[*r].deleted)
            .collect()
    }

    /// Deleted leaves other than the winner (`_deleted_conflicts`).
    pub fn deleted_conflicts(&self) -> Vec<&str> {
        self.leaves()
            .into_iter()
            .skip(1)
            .filter(|r| self.nodes[*r].deleted)
            .collect()
    }

    /// `rev` and its known ancestors, newest first.
    pub fn path(&self, rev: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut at = self.nodes.get_key_value(rev);
        while let Some((r, n)) = at {
            if out.len() > self.nodes.len() {
                break; // a cycle cannot be built through this API; be safe anyway
            }
            out.push(r.as_str());
            at = n
                .parent
                .as_deref()
                .and_then(|p| self.nodes.get_key_value(p));
        }
        out
    }

    /// The leaves that descend from `rev` (itself when it is a leaf).
    pub fn leaves_from(&self, rev: &str) -> Vec<&str> {
        self.leaves()
            .into_iter()
            .filter(|l| self.path(l).contains(&rev))
            .collect()
    }

    /// Adds a leaf revision with its body as a child of `parent` (a leaf
    /// the caller checked, or none for a first revision).
    pub fn add_child(
        &mut self,
        parent: Option<&str>,
        rev: String,
        deleted: bool,
        body: Map<String, Value>,
    ) {
        if let Some(p) = parent.and_then(|p| self.nodes.get_mut(p)) {
            p.body = None;
        }
        self.nodes.insert(
            rev,
            Node {
                parent: parent.map(str::to_owned),
                deleted,
                body: Some(body),
            },
        );
    }

    /// Merges a replicated path, newest first (`path[0]` is the leaf that
    /// carries `body`). Returns false when the leaf was already known: then
    /// nothing changes (a revision's content never changes).
    pub fn merge_path(&mut self, path: &[String], deleted: bool, body: Map<String, Value>) -> bool {
        let Some(leaf) = path.first() else {
            return false;
        };
        if self.nodes.contains_key(leaf) {
            return false;
        }
        for (i, rev) in path.iter().enumerate() {
            let parent = path.get(i + 1).cloned();
            match self.nodes.get_mut(rev) {
                Some(n) => {
                    // Known: it has a child now; link it further back if
                    // its own parent had been stemmed or never sent.
                    n.body = None;
                    if n.parent.is_some() || parent.is_none() {
                        break;
                    }
                    n.parent = parent;
                }
                None => {
                    let first = i == 0;
                    self.nodes.insert(
                        rev.clone(),
                        Node {
                            parent,
                            deleted: first && deleted,
                            body: first.then(|| body.clone()),
                        },
                    );
                }
            }
        }
        true
    }

    /// Keeps at most `limit` revisions on the path from each leaf back
    /// (every leaf is kept, whatever the limit); older ones go, and the
    /// oldest kept revision of each path becomes a root.
    /// How many revisions went.
    pub fn stem(&mut self, limit: usize) -> usize {
        let limit = limit.max(1);
        let before = self.nodes.len();
        let mut keep: BTreeSet<String> = BTreeSet::new();
        for leaf in self.leaves() {
            for r in self.path(leaf).into_iter().take(limit) {
                keep.insert(r.to_owned());
            }
        }
        self.nodes.retain(|r, _| keep.contains(r));
        for n in self.nodes.values_mut() {
            if n.parent.as_ref().is_some_and(|p| !keep.contains(p)) {
                n.parent = None;
            }
        }
        before - self.nodes.len()
    }

    /// `_revisions` for `rev`: its generation and the hashes of its path.
    pub fn revisions(&self, rev: &str) -> Value {
        let ids: Vec<&str> = self.path(rev).into_iter().map(hash_part).collect();
        serde_json::json!({"start": generation(rev), "ids": ids})
    }

    /// `_revs_info` for `rev`: each revision on its path and whether its
    /// body is here.
    pub fn revs_info(&self, rev: &str) -> Value {
        let info: Vec<Value> = self
            .path(rev)
            .into_iter()
            .map(|r| {
                let n = &self.nodes[r];
                let status = if n.deleted {
                    "deleted"
                } else if n.body.is_some() {
                    "available"
                } else {
                    "missing"
                };
                serde_json::json!({"rev": r, "status": status})
            })
            .collect();
        Value::Array(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn path(revs: &[&str]) -> Vec<String> {
        revs.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn revs_parse_only_when_well_formed() {
        assert_eq!(
            Rev::parse("12-abc"),
            Some(Rev {
                generation: 12,
                hash: "abc".into()
            })
        );
        for bad in ["0-abc", "1-", "-abc", "x-abc", "abc", "+1-a", ""] {
            assert_eq!(Rev::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn new_revs_are_deterministic_and_one_generation_on() {
        let b = body(json!({"a": 1}));
        let r1 = new_rev(None, false, &b);
        assert!(r1.starts_with("1-"));
        assert_eq!(r1.len(), 2 + 32);
        assert_eq!(r1, new_rev(None, false, &b));
        assert_ne!(r1, new_rev(None, true, &b));
        let r2 = new_rev(Some(&r1), false, &b);
        assert!(r2.starts_with("2-"));
        assert_ne!(r2[2..], r1[2..]);
    }

    #[test]
    fn winner_is_live_then_higher_generation_then_higher_hash() {
        let mut t = RevTree::default();
        t.add_child(None, "1-a".into(), false, body(json!({})));
        t.merge_path(&path(&["2-b", "1-a"]), false, body(json!({"v": "b"})));
        t.merge_path(&path(&["2-c", "1-a"]), false, body(json!({"v": "c"})));
        // Same generation: the higher hash as a string wins.
        assert_eq!(t.winner(), Some("2-c"));
        assert_eq!(t.conflicts(), vec!["2-b"]);
        // A higher generation wins over a higher hash.
        t.merge_path(&path(&["3-a", "2-b"]), false, body(json!({})));
        assert_eq!(t.winner(), Some("3-a"));
        assert_eq!(t.conflicts(), vec!["2-c"]);
        // A deleted leaf loses to any live one, even of a lower generation.
        t.merge_path(&path(&["4-z", "3-a"]), true, body(json!({})));
        assert_eq!(t.winner(), Some("2-c"));
        assert_eq!(t.conflicts(), Vec::<&str>::new());
        assert_eq!(t.deleted_conflicts(), vec!["4-z"]);
        assert!(!t.deleted());
        // All deleted: the usual order among the deleted.
        t.merge_path(&path(&["3-d", "2-c"]), true, body(json!({})));
        assert_eq!(t.winner(), Some("4-z"));
        assert!(t.deleted());
        assert_eq!(t.deleted_conflicts(), vec!["3-d"]);
        // Generations compare as numbers, not strings.
        let mut n = RevTree::default();
        n.merge_path(&path(&["9-z"]), false, body(json!({})));
        n.merge_path(&path(&["10-a"]), false, body(json!({})));
        assert_eq!(n.winner(), Some("10-a"));
    }

    #[test]
    fn conflicts_are_kept_and_only_leaves_keep_bodies() {
        let mut t = RevTree::default();
        t.add_child(None, "1-a".into(), false, body(json!({"v": 1})));
        assert!(t.merge_path(&path(&["2-x", "1-a"]), false, body(json!({"v": "x"}))));
        assert!(t.merge_path(&path(&["2-y", "1-a"]), false, body(json!({"v": "y"}))));
        assert_eq!(t.leaves(), vec!["2-y", "2-x"]);
        assert_eq!(t.node("1-a").unwrap().body, None);
        assert_eq!(t.node("2-x").unwrap().body, Some(body(json!({"v": "x"}))));
        // Known leaf: nothing changes, not even its body.
        assert!(!t.merge_path(&path(&["2-x", "1-a"]), false, body(json!({"v": "other"}))));
        assert_eq!(t.node("2-x").unwrap().body, Some(body(json!({"v": "x"}))));
        assert!(t.is_leaf("2-x") && t.is_leaf("2-y") && !t.is_leaf("1-a"));
        assert_eq!(t.leaves_from("1-a"), vec!["2-y", "2-x"]);
        assert_eq!(t.leaves_from("2-x"), vec!["2-x"]);
        // Editing the losing branch keeps the other.
        t.add_child(Some("2-x"), "3-x".into(), false, body(json!({})));
        assert_eq!(t.winner(), Some("3-x"));
        assert_eq!(t.conflicts(), vec!["2-y"]);
        assert_eq!(
            t.revisions("3-x"),
            json!({"start": 3, "ids": ["x", "x", "a"]})
        );
        assert_eq!(
            t.revs_info("3-x"),
            json!([
                {"rev": "3-x", "status": "available"},
                {"rev": "2-x", "status": "missing"},
                {"rev": "1-a", "status": "missing"}
            ])
        );
    }

    #[test]
    fn merging_paths_links_them_where_they_meet() {
        let mut t = RevTree::default();
        // A stemmed path arrives first: 3-c without 1 and 2.
        t.merge_path(&path(&["3-c"]), false, body(json!({})));
        assert_eq!(t.path("3-c"), vec!["3-c"]);
        // A longer path through it: it is linked, not a second branch.
        t.merge_path(&path(&["4-d", "3-c", "2-b", "1-a"]), false, body(json!({})));
        assert_eq!(t.path("4-d"), vec!["4-d", "3-c", "2-b", "1-a"]);
        assert_eq!(t.leaves(), vec!["4-d"]);
        // An unrelated root (a document made on two sides) is a conflict.
        t.merge_path(&path(&["2-q", "1-p"]), false, body(json!({})));
        assert_eq!(t.winner(), Some("4-d"));
        assert_eq!(t.conflicts(), vec!["2-q"]);
    }

    #[test]
    fn stemming_keeps_every_leaf_and_the_newest_history() {
        let mut t = RevTree::default();
        let long: Vec<String> = (1..=10).rev().map(|g| format!("{g}-m")).collect();
        t.merge_path(&long, false, body(json!({})));
        // A short branch off generation 2.
        t.merge_path(&path(&["3-s", "2-m"]), false, body(json!({})));
        t.stem(3);
        assert_eq!(t.path("10-m"), vec!["10-m", "9-m", "8-m"]);
        assert_eq!(t.path("3-s"), vec!["3-s", "2-m", "1-m"]);
        assert_eq!(t.nodes.len(), 6);
        assert_eq!(t.leaves(), vec!["10-m", "3-s"]);
        // A limit of 1 still keeps both leaves, each a root.
        t.stem(1);
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), vec!["10-m", "3-s"]);
        assert_eq!(t.node("10-m").unwrap().parent, None);
        assert_eq!(t.conflicts(), vec!["3-s"]);
    }
}
