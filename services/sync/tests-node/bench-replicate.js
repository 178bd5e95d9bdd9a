// PouchDB's replicator (under Node, both sides over HTTP) copying one
// database from a server to another, for `scripts/bench sync`'s
// box-to-box row between two pouchdb-servers:
//   BENCH_SOURCE=http://127.0.0.1:A/db BENCH_TARGET=http://127.0.0.1:B/db node bench-replicate.js
// The target database is created by the replication. Checks that the
// target holds as many documents as the source; the last line is
// `result {JSON}` with the seconds the replication took.
'use strict';

const assert = require('node:assert/strict');
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-http'))
  .plugin(require('pouchdb-replication'));

const source = process.env.BENCH_SOURCE;
const target = process.env.BENCH_TARGET;
if (!source || !target) {
  console.error('BENCH_SOURCE and BENCH_TARGET must be set');
  process.exit(2);
}

async function main() {
  const src = new PouchDB(source, { skip_setup: true });
  const want = (await src.info()).doc_count;
  const dst = new PouchDB(target);
  const t = process.hrtime.bigint();
  const r = await PouchDB.replicate(src, dst);
  const secs = Number(process.hrtime.bigint() - t) / 1e9;
  assert.equal(r.ok, true);
  assert.equal(r.docs_written, want, 'documents written');
  assert.equal((await dst.info()).doc_count, want, 'documents on the target');
  console.log(`result ${JSON.stringify({ docs: want, seconds: secs })}`);
}

main().catch((e) => {
  // PouchDB's errors from a server's answer carry its status and reason.
  const answer = e && e.status ? `${e.status} ${e.name}: ${e.reason || e.message} ` : '';
  console.error(`${answer}${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
