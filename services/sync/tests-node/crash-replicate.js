// PouchDB (in memory, under Node) pushing into the sync service while the
// service is killed, round after round. Driven by
// services/cloudletd/tests/sync_crash.rs (and tests-qemu/tests/sync.rs):
//
//   SYNC_URL=http://any:TOKEN@HOST:PORT node crash-replicate.js
//
// Each round adds documents to the source (new ones, some with an
// attachment, and edits of older ones), starts a push and, once CRASH_KILL_AFTER
// (or a round-dependent number of) `_bulk_docs` are acknowledged, prints
// `kill` on stdout. The driver then kills the service (or the VM), starts
// it again and answers with a line `url URL` on stdin. The script checks
// what the box kept, pushes again and checks that the second push resumed
// from PouchDB's checkpoint and sent nothing that was already acknowledged,
// and that both sides are equal. It prints `all passed` at the end and
// exits non-zero (the failed check on stderr) when anything differs.
//
// Environment: CRASH_ROUNDS (20), CRASH_DOCS (new documents a round, 2000),
// CRASH_KILL_AFTER (acknowledged `_bulk_docs` before asking for the kill;
// by default 2 to 8 depending on the round, so a checkpoint was always
// acknowledged before the kill).
'use strict';

const assert = require('node:assert/strict');
const readline = require('node:readline');
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-memory'))
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-replication'));
// The fetch PouchDB's HTTP adapter uses by default (a dependency of
// pouchdb-adapter-http), wrapped below to see what the box acknowledged.
const { fetch: pouchFetch } = require('pouchdb-fetch');

const ROUNDS = Number(process.env.CRASH_ROUNDS || 20);
const DOCS = Number(process.env.CRASH_DOCS || 2000);
const EDITS = Math.floor(DOCS / 20);
const DB = 'crash';
let base = process.env.SYNC_URL;
if (!base) {
  console.error('SYNC_URL is not set');
  process.exit(2);
}

// Lines from the driver, one at a time.
const lines = [];
let waiting = null;
readline.createInterface({ input: process.stdin }).on('line', (l) => {
  if (waiting) {
    const w = waiting;
    waiting = null;
    w(l);
  } else {
    lines.push(l);
  }
});
function nextLine() {
  if (lines.length) return Promise.resolve(lines.shift());
  return new Promise((resolve) => { waiting = resolve; });
}

/// What one push sent the box and what the box acknowledged.
class Watch {
  constructor(killAfter) {
    this.killAfter = killAfter; // ask for the kill after this many acks (or never)
    this.bulks = []; // [{ docs: [[id, rev]], acked }]
    this.checkpoints = []; // acknowledged checkpoint writes: { id, last_seq }
    this.asked = false;
    this.diffed = 0; // changes the push asked the box about (`_revs_diff`)
  }

  fetch() {
    return async (url, opts) => {
      const path = new URL(url).pathname;
      const method = (opts.method || 'GET').toUpperCase();
      let bulk = null;
      let checkpoint = null;
      if (method === 'POST' && path.endsWith('/_bulk_docs')) {
        const body = JSON.parse(opts.body);
        bulk = { docs: body.docs.map((d) => [d._id, d._rev]), acked: false, refused: [] };
        this.bulks.push(bulk);
      } else if (method === 'POST' && path.endsWith('/_revs_diff')) {
        this.diffed += Object.keys(JSON.parse(opts.body)).length;
      } else if (method === 'PUT' && path.includes('/_local/')) {
        const body = JSON.parse(opts.body);
        checkpoint = { id: decodeURIComponent(path.split('/_local/')[1]), last_seq: body.last_seq };
      }
      const res = await pouchFetch(url, opts);
      if (bulk && res.status === 201) {
        // With new_edits=false only refusals are listed.
        bulk.refused = await res.clone().json();
        bulk.acked = true;
        const acked = this.bulks.filter((b) => b.acked).length;
        if (acked === this.killAfter && !this.asked) {
          this.asked = true;
          console.log('kill');
        }
      }
      if (checkpoint && res.status === 201) this.checkpoints.push(checkpoint);
      return res;
    };
  }

  ackedDocs() {
    return this.bulks.filter((b) => b.acked).flatMap((b) => b.docs);
  }
}

function remote(watch) {
  const opts = watch ? { fetch: watch.fetch() } : {};
  return new PouchDB(`${base}/${DB}`, opts);
}

/// Deterministic bytes for an attachment.
function bytes(n, seed) {
  const out = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/// The box's `_changes` from the start: sequences strictly increase, and
/// the last one is the database's update_seq.
async function changesOrdered(db, updateSeq) {
  // One request (PouchDB's HTTP adapter reads 25 changes a request by default).
  const res = await db.changes({ since: 0, batch_size: 1000000 });
  let last = 0;
  for (const row of res.results) {
    assert.ok(Number(row.seq) > last, `_changes went from ${last} to ${row.seq}`);
    last = Number(row.seq);
  }
  assert.equal(Number(res.last_seq), updateSeq, "_changes' last_seq is update_seq");
}

/// The winning rev of each id on the box.
async function revsOn(db, ids) {
  const res = await db.allDocs({ keys: ids });
  const out = new Map();
  for (const row of res.rows) if (row.value && !row.value.deleted) out.set(row.id, row.value.rev);
  return out;
}

async function main() {
  const source = new PouchDB('source', { adapter: 'memory' });
  let updateSeq = 0; // the box's update_seq after the last complete push
  let ids = [];
  for (let r = 0; r < ROUNDS; r++) {
    // New documents, every 40th with an attachment; edits of older ones.
    const docs = [];
    for (let i = 0; i < DOCS; i++) {
      const doc = { _id: `r${String(r).padStart(2, '0')}-${String(i).padStart(5, '0')}`, round: r, i, text: `document ${r}/${i}` };
      if (i % 40 === 0) {
        doc._attachments = { 'a.bin': { content_type: 'application/octet-stream', data: bytes(2048 + i, r * 100000 + i + 1).toString('base64') } };
      }
      docs.push(doc);
    }
    if (ids.length) {
      const old = await source.allDocs({ include_docs: true, keys: ids.slice((r * 131) % ids.length).slice(0, EDITS) });
      for (const row of old.rows) docs.push({ ...row.doc, edited_in: r });
    }
    const written = await source.bulkDocs(docs);
    assert.equal(written.filter((w) => w.ok).length, docs.length);
    ids = ids.concat(docs.slice(0, DOCS).map((d) => d._id));
    const sourceInfo = await source.info();

    // Push until the box is killed.
    // From 2 on, a checkpoint was acknowledged before the kill.
    const killAfter = Number(process.env.CRASH_KILL_AFTER || 2 + (r % 7));
    const a = new Watch(killAfter);
    const first = source.replicate.to(remote(a), { retry: false }).then(
      (res) => ({ res }),
      (err) => ({ err }),
    );
    const outcome = await first;
    assert.ok(a.asked, `round ${r}: the push ended before ${killAfter} acknowledged batches`);
    const line = await nextLine();
    assert.ok(line.startsWith('url '), `the driver said ${line}`);
    base = line.slice(4);

    // The box kept every acknowledged batch whole, and any batch in flight
    // is there whole or not at all.
    const box = remote(null);
    const info = await box.info();
    const ackedDocs = a.ackedDocs();
    const refused = a.bulks.flatMap((b) => b.refused);
    assert.deepEqual(refused, [], `round ${r}: the box refused documents`);
    assert.ok(info.update_seq >= updateSeq + ackedDocs.length,
      `round ${r}: update_seq ${info.update_seq} after the restart, before it ${updateSeq} and ${ackedDocs.length} acknowledged writes`);
    const inFlight = a.bulks.filter((b) => !b.acked).flatMap((b) => b.docs);
    assert.ok(info.update_seq <= updateSeq + ackedDocs.length + inFlight.length,
      `round ${r}: update_seq ${info.update_seq} counts writes never sent`);
    await changesOrdered(box, info.update_seq);
    const have = await revsOn(box, ackedDocs.map(([id]) => id));
    for (const [id, rev] of ackedDocs) assert.equal(have.get(id), rev, `round ${r}: acknowledged ${id} ${rev} is not on the box`);
    for (const b of a.bulks.filter((x) => !x.acked)) {
      const on = await revsOn(box, b.docs.map(([id]) => id));
      const there = b.docs.filter(([id, rev]) => on.get(id) === rev).length;
      assert.ok(there === 0 || there === b.docs.length, `round ${r}: ${there} of ${b.docs.length} documents of an unacknowledged batch are on the box`);
    }

    // The box kept the last checkpoint it acknowledged.
    assert.ok(a.checkpoints.length > 0, `round ${r}: no checkpoint was acknowledged`);
    const last = a.checkpoints[a.checkpoints.length - 1];
    const sourceCp = await source.get(`_local/${last.id}`);
    const kept = await box.get(`_local/${last.id}`);
    assert.ok(kept.last_seq >= last.last_seq, `round ${r}: the box's checkpoint went back from ${last.last_seq} to ${kept.last_seq}`);
    assert.equal(kept.session_id, sourceCp.session_id, `round ${r}: the checkpoints are of different pushes`);
    assert.equal(sourceCp.last_seq, last.last_seq, `round ${r}: the source's checkpoint is not the last one the box acknowledged`);

    // Push again: it reads the changes after the checkpoint, not from 0,
    // and sends only what the box lacks: no document it acknowledged before.
    const since = sourceCp.last_seq;
    const pending = (await source.changes({ since, style: 'all_docs' })).results;
    const there = await revsOn(box, pending.map((c) => c.id));
    const missing = pending.filter((c) => there.get(c.id) !== c.changes[0].rev).length;
    const b = new Watch(-1);
    const second = await source.replicate.to(remote(b), { retry: false });
    assert.equal(second.ok, true);
    assert.ok(since > 0, `round ${r}: no checkpoint to resume from`);
    assert.equal(b.diffed, pending.length, `round ${r}: the second push asked about ${b.diffed} changes, not the ${pending.length} after the checkpoint ${since}`);
    assert.ok(pending.length < sourceInfo.doc_count, `round ${r}: the second push started from 0`);
    assert.equal(second.docs_read, missing, `round ${r}: the second push read ${second.docs_read} documents, the box lacked ${missing}`);
    assert.equal(second.docs_written, missing, `round ${r}: the second push wrote ${second.docs_written} documents, the box lacked ${missing}`);
    const acked = new Set(ackedDocs.map(([id, rev]) => `${id} ${rev}`));
    const again = b.ackedDocs().filter(([id, rev]) => acked.has(`${id} ${rev}`));
    assert.deepEqual(again, [], `round ${r}: acknowledged documents sent again`);

    // Both sides equal: every id and rev, and this round's documents whole.
    const all = async (db, opts) => (await db.allDocs(opts)).rows.map((row) => [row.id, row.value.rev]);
    assert.deepEqual(await all(box, {}), await all(source, {}), `round ${r}: ids and revs differ`);
    const range = { startkey: `r${String(r).padStart(2, '0')}-`, endkey: `r${String(r).padStart(2, '0')}-\uffff`, include_docs: true, attachments: true, binary: false };
    const docsOf = async (db) => (await db.allDocs(range)).rows.map((row) => {
      const d = row.doc;
      return d;
    });
    assert.deepEqual(await docsOf(box), await docsOf(source), `round ${r}: documents differ`);
    const after = await box.info();
    assert.ok(after.update_seq >= info.update_seq);
    updateSeq = after.update_seq;
    console.log(`round ${r}: killed after ${a.ackedDocs().length} acknowledged writes (${outcome.err ? 'push failed' : 'push had finished'}), resumed from ${since} (${pending.length} changes after it), second push read ${second.docs_read} and wrote ${second.docs_written}; update_seq ${updateSeq}`);
  }
  console.log('all passed');
}

main().then(() => process.exit(0), (e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
