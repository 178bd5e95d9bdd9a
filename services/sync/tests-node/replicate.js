// Real PouchDB (in-memory databases, under Node) replicating with the sync
// service. Run by services/cloudletd/tests/sync.rs:
//   SYNC_URL=http://any:TOKEN@127.0.0.1:PORT node replicate.js
// Exits non-zero (with the failed check on stderr) when anything differs.
// With SYNC_BENCH_DOCS=N it also pushes and pulls N documents of 1 KiB and
// prints the rates.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-memory'))
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-replication'));

const base = process.env.SYNC_URL;
if (!base) {
  console.error('SYNC_URL is not set');
  process.exit(2);
}

let nextName = 0;
const local = () => new PouchDB(`local-${nextName++}`, { adapter: 'memory' });
const remote = (name) => new PouchDB(`${base}/${name}`);

function step(name) {
  console.log(`step: ${name}`);
}

/// A deterministic byte sequence (so a failure can be reproduced).
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

async function everything(db) {
  const res = await db.allDocs({ include_docs: true, attachments: true, conflicts: true });
  return res.rows.map((r) => r.doc);
}

async function waitFor(what, check, ms = 20000) {
  const until = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch (e) {
      if (e.status !== 404) throw e;
    }
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function roundTrip() {
  step('push 200 documents (some with attachments) to the service, pull them into a second PouchDB');
  const a = local();
  const docs = [];
  for (let i = 0; i < 200; i++) {
    const doc = { _id: `doc-${String(i).padStart(3, '0')}`, n: i, text: `document ${i}`, nested: { list: [i, i * 2] } };
    if (i % 20 === 0) {
      doc._attachments = {
        'note.txt': { content_type: 'text/plain', data: Buffer.from(`attachment of ${i}\n`).toString('base64') },
      };
    }
    if (i % 50 === 0) {
      doc._attachments = doc._attachments || {};
      // One of 5 MiB (the binary attachment), the others 1 MiB.
      const size = i === 50 ? 5 << 20 : 1 << 20;
      doc._attachments['blob.bin'] = { content_type: 'application/octet-stream', data: bytes(size, i + 1).toString('base64') };
    }
    docs.push(doc);
  }
  const written = await a.bulkDocs(docs);
  assert.equal(written.filter((r) => r.ok).length, 200);
  // Two edits and a deletion, so revision histories are longer than one.
  const d1 = await a.get('doc-001');
  await a.put({ ...d1, text: 'edited once' });
  const d2 = await a.get('doc-002');
  await a.remove(d2);

  const server = remote('roundtrip');
  let t = Date.now();
  const push = await a.replicate.to(server);
  const pushMs = Date.now() - t;
  assert.equal(push.ok, true);
  assert.equal(push.docs_written, 200);
  const info = await server.info();
  assert.equal(info.doc_count, 199);
  assert.equal(info.doc_del_count, 1);

  const b = local();
  t = Date.now();
  const pull = await b.replicate.from(server);
  const pullMs = Date.now() - t;
  assert.equal(pull.ok, true);
  assert.equal(pull.docs_written, 200);

  const fromA = await everything(a);
  const fromB = await everything(b);
  assert.equal(fromA.length, 199);
  assert.deepEqual(fromB, fromA, 'the pulled copy equals the original');
  const withBlob = fromB.find((d) => d._id === 'doc-050');
  assert.equal(Buffer.from(withBlob._attachments['blob.bin'].data, 'base64').equals(bytes(5 << 20, 51)), true);
  // The deletion arrived too, with the same revision.
  const gone = await b.get('doc-002', { revs: true, open_revs: 'all' });
  const goneA = await a.get('doc-002', { revs: true, open_revs: 'all' });
  assert.deepEqual(gone, goneA);
  // Attachments read raw from the service are the bytes sent.
  const raw = await server.getAttachment('doc-100', 'blob.bin');
  assert.equal(Buffer.from(raw).equals(bytes(1 << 20, 101)), true);
  // A second replication has nothing to do (checkpoints on both sides).
  const again = await b.replicate.from(server);
  assert.equal(again.docs_written, 0);
  const againPush = await a.replicate.to(server);
  assert.equal(againPush.docs_written, 0);
  return { pushMs, pullMs };
}

async function live() {
  step('live replication picks up a change made on the server');
  const server = remote('live');
  await server.put({ _id: 'first', v: 1 });
  const c = local();
  const rep = c.replicate.from(server, { live: true, retry: true });
  let failed = null;
  rep.on('error', (e) => { failed = e; });
  try {
    await waitFor('the first document', async () => (await c.get('first')).v === 1);
    const first = await server.get('first');
    await server.put({ ...first, v: 2 });
    await server.put({ _id: 'second', v: 'made on the server' });
    await waitFor('the edit and the new document', async () =>
      (await c.get('first')).v === 2 && (await c.get('second')).v === 'made on the server');
    assert.equal(failed, null);
  } finally {
    rep.cancel();
  }
}

async function conflicts() {
  step('a conflict made on both sides ends with the same winner and _conflicts everywhere');
  const server = remote('conflicts');
  const x = local();
  const y = local();
  await x.put({ _id: 'k', v: 'base' });
  await x.replicate.to(server);
  await y.replicate.from(server);
  const bx = await x.get('k');
  const by = await y.get('k');
  await x.put({ ...bx, v: 'from x' });
  await y.put({ ...by, v: 'from y' });
  await x.replicate.to(server);
  await y.replicate.to(server);
  await x.replicate.from(server);
  await y.replicate.from(server);
  const ax = await x.get('k', { conflicts: true });
  const ay = await y.get('k', { conflicts: true });
  const as = await server.get('k', { conflicts: true });
  assert.deepEqual(ay, ax);
  assert.deepEqual(as, ax);
  assert.equal(ax._conflicts.length, 1);
  // Resolving on one side (deleting the loser) converges too.
  await x.remove('k', ax._conflicts[0]);
  await x.replicate.to(server);
  await y.replicate.from(server);
  const rx = await x.get('k', { conflicts: true });
  const ry = await y.get('k', { conflicts: true });
  assert.deepEqual(ry, rx);
  assert.equal(rx._conflicts, undefined);
}

async function bench(n) {
  step(`bench: push then pull ${n} documents of 1 KiB`);
  const a = local();
  const docs = [];
  for (let i = 0; i < n; i++) {
    docs.push({ _id: `b-${String(i).padStart(6, '0')}`, pad: crypto.randomBytes(384).toString('hex').slice(0, 1000) });
  }
  await a.bulkDocs(docs);
  const server = remote(`bench-${Date.now()}`);
  let t = Date.now();
  await a.replicate.to(server, { batch_size: 100 });
  const push = n / ((Date.now() - t) / 1000);
  const b = local();
  t = Date.now();
  await b.replicate.from(server, { batch_size: 100 });
  const pull = n / ((Date.now() - t) / 1000);
  assert.equal((await b.info()).doc_count, n);
  return { push, pull };
}

(async () => {
  const { pushMs, pullMs } = await roundTrip();
  console.log(`figure: round trip of 200 docs (1 x 5 MiB, 3 x 1 MiB, 10 text attachments): push ${pushMs} ms, pull ${pullMs} ms`);
  await live();
  await conflicts();
  const n = Number(process.env.SYNC_BENCH_DOCS || 0);
  if (n > 0) {
    const r = await bench(n);
    console.log(`figure: ${n} docs of 1 KiB: push ${r.push.toFixed(0)} docs/s, pull ${r.pull.toFixed(0)} docs/s`);
  }
  console.log('all passed');
})().catch((e) => {
  console.error('FAILED:', e && e.stack ? e.stack : e);
  process.exit(1);
});
