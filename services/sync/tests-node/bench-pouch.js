// PouchDB (in memory, under Node) pushing then pulling against one CouchDB-
// compatible server, for `scripts/bench sync` (tests-qemu/src/bin/sync_bench.rs):
//   BENCH_URL=http://[user:pass@]127.0.0.1:PORT BENCH_WORKLOAD=docs|atts node bench-pouch.js
// One workload a run, each in a database of its own on the server:
//   * docs: BENCH_DOCS (10,000) documents of 1 KiB: push from one PouchDB,
//     pull into a second, empty one;
//   * atts: BENCH_ATTS (100) documents with a 1 MiB binary attachment each:
//     the same.
// PouchDB's replicator runs with its defaults (batches of 100 documents).
// Every pull is checked against what was pushed (ids, revs, and the
// attachments' bytes by digest) before a figure is printed. The last line is
// `result {JSON}` with the rates; anything that failed exits non-zero.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-memory'))
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-replication'));

const base = process.env.BENCH_URL;
if (!base) {
  console.error('BENCH_URL is not set');
  process.exit(2);
}
const DOCS = Number(process.env.BENCH_DOCS || 10000);
const ATTS = Number(process.env.BENCH_ATTS || 100);
const ATT_BYTES = 1 << 20;
const DOC_BYTES = 1024;

let nextName = 0;
const local = () => new PouchDB(`bench-${process.pid}-${nextName++}`, { adapter: 'memory' });

/// id -> rev of every document (and the attachment digests, when asked).
async function contents(db, withAtts) {
  const res = await db.allDocs({ include_docs: withAtts });
  return res.rows.map((r) => {
    const row = [r.id, r.value.rev];
    if (withAtts) {
      const a = r.doc._attachments || {};
      row.push(Object.keys(a).sort().map((k) => [k, a[k].digest, a[k].length]));
    }
    return row;
  });
}

/// Pushes `docs` from a fresh PouchDB to `name` on the server, pulls them
/// into another, checks they arrived whole; seconds for each direction.
async function pushPull(name, docs, withAtts) {
  const a = local();
  // Written in pieces: one bulkDocs of 100 MiB of base64 is slow in the memory adapter.
  for (let i = 0; i < docs.length; i += 500) {
    const w = await a.bulkDocs(docs.slice(i, i + 500));
    assert.equal(w.filter((r) => r.ok).length, Math.min(500, docs.length - i));
  }
  const remote = new PouchDB(`${base}/${name}`);
  let t = process.hrtime.bigint();
  const push = await a.replicate.to(remote);
  const pushS = Number(process.hrtime.bigint() - t) / 1e9;
  assert.equal(push.ok, true);
  assert.equal(push.docs_written, docs.length, `${name}: pushed`);
  const info = await remote.info();
  assert.equal(info.doc_count, docs.length, `${name}: on the server`);

  const b = local();
  t = process.hrtime.bigint();
  const pull = await b.replicate.from(remote);
  const pullS = Number(process.hrtime.bigint() - t) / 1e9;
  assert.equal(pull.ok, true);
  assert.equal(pull.docs_written, docs.length, `${name}: pulled`);
  assert.deepEqual(await contents(b, withAtts), await contents(a, withAtts), `${name}: the pulled copy differs`);
  await a.destroy();
  await b.destroy();
  return { push_s: pushS, pull_s: pullS };
}

async function docs() {
  const filler = 'x'.repeat(DOC_BYTES - 64);
  const small = [];
  for (let i = 0; i < DOCS; i++) {
    small.push({ _id: `doc-${String(i).padStart(6, '0')}`, n: i, text: filler });
  }
  const s = await pushPull('bench-docs', small, false);
  return { docs: DOCS, docs_push_per_s: DOCS / s.push_s, docs_pull_per_s: DOCS / s.pull_s };
}

async function atts() {
  const big = [];
  for (let i = 0; i < ATTS; i++) {
    const data = crypto.randomBytes(ATT_BYTES);
    big.push({
      _id: `att-${String(i).padStart(4, '0')}`,
      n: i,
      _attachments: { 'blob.bin': { content_type: 'application/octet-stream', data: data.toString('base64') } },
    });
  }
  const a = await pushPull('bench-atts', big, true);
  const mib = (ATTS * ATT_BYTES) / (1 << 20);
  return { atts: ATTS, atts_push_mib_s: mib / a.push_s, atts_pull_mib_s: mib / a.pull_s };
}

async function main() {
  const workloads = { docs, atts };
  const run = workloads[process.env.BENCH_WORKLOAD];
  if (!run) throw new Error(`BENCH_WORKLOAD must be one of ${Object.keys(workloads).join(', ')}`);
  console.log(`result ${JSON.stringify(await run())}`);
}

main().catch((e) => {
  // PouchDB's errors from a server's answer carry its status and reason.
  const answer = e && e.status ? `${e.status} ${e.name}: ${e.reason || e.message} ` : '';
  console.error(`${answer}${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
