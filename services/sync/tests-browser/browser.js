// PouchDB in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) as a peer of the box's sync service. Run by
// services/cloudletd/tests/sync_browser.rs:
//   SYNC_ADDR=127.0.0.1:PORT SYNC_TOKEN=T node browser.js
// It serves a page from 127.0.0.1:<free port> and prints `origin URL`; the
// page cannot reach the box until the owner allows that origin, so it then
// waits for one line on stdin (the test sends it after
// `PUT /_cloudlet/cors`). The page's PouchDB (IndexedDB) pulls a database,
// pushes to it, syncs live both ways, goes offline (its local writes
// still succeed while the box takes writes of its own, one document edited
// on both sides), comes back and catches up. Every step checks what it
// must (node:assert); the last line is `result {JSON}` with what the page
// holds, which the Rust test compares with the box. Exits non-zero on any
// failed check.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const { chromium } = require('playwright-core');

const addr = process.env.SYNC_ADDR;
const token = process.env.SYNC_TOKEN;
if (!addr || !token) {
  console.error('SYNC_ADDR and SYNC_TOKEN must be set');
  process.exit(2);
}
const BOX = `http://${addr}`;
const DB = 'notes';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function step(name) {
  console.log(`step: ${name}`);
}

/// The box as the test's Node side sees it (not the browser): the token
/// as a bearer credential.
async function box(method, p, body) {
  const r = await fetch(`${BOX}${p}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json', Accept: 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function boxPut(id, doc) {
  const r = await box('PUT', `/${DB}/${encodeURIComponent(id)}`, doc);
  assert.equal(r.status, 201, `PUT ${id} on the box: ${JSON.stringify(r.body)}`);
  return r.body.rev;
}

/// The box's documents: id -> {rev, deleted, conflicts}.
async function boxDocs() {
  const out = {};
  const all = await box('GET', `/${DB}/_all_docs?include_docs=true&conflicts=true`);
  assert.equal(all.status, 200);
  for (const row of all.body.rows) {
    out[row.id] = { rev: row.value.rev, conflicts: (row.doc._conflicts || []).slice().sort() };
  }
  return out;
}

/// One text for equal maps of documents, whatever order they came in.
function canonical(docs) {
  return JSON.stringify(Object.keys(docs).sort().map((id) => [id, docs[id].rev, docs[id].conflicts]));
}

async function waitFor(what, check, ms = 60000) {
  const until = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/// Serves the page and PouchDB's browser build on 127.0.0.1:<free port>.
function serve() {
  const pouch = fs.readFileSync(require.resolve('pouchdb/dist/pouchdb.min.js'));
  const page = Buffer.from(
    '<!doctype html><meta charset="utf-8"><title>cloudlet sync peer</title>' +
      '<script src="/pouchdb.min.js"></script><p>PouchDB peer</p>',
  );
  const server = http.createServer((req, res) => {
    const [type, body] =
      req.url === '/' ? ['text/html', page] : req.url === '/pouchdb.min.js' ? ['text/javascript', pouch] : [null, null];
    if (!body) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'Content-Type': type, 'Content-Length': body.length }).end(body);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

/// Can the page reach the box (a credentialed GET /, CORS applied)?
async function pageReachesBox(page) {
  return page.evaluate(
    async ({ url, token }) => {
      try {
        const r = await fetch(`${url}/`, { headers: { Authorization: `Basic ${btoa(`browser:${token}`)}` }, credentials: 'include' });
        return r.ok;
      } catch (e) {
        return false;
      }
    },
    { url: BOX, token },
  );
}

/// What the page's PouchDB holds: id -> {rev, conflicts}.
async function pageDocs(page) {
  return page.evaluate(async () => {
    const res = await window.local.allDocs({ include_docs: true, conflicts: true });
    const out = {};
    for (const row of res.rows) out[row.id] = { rev: row.value.rev, conflicts: (row.doc._conflicts || []).slice().sort() };
    return out;
  });
}

async function main() {
  const server = await serve();
  const origin = `http://127.0.0.1:${server.address().port}`;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-chromium-'));
  // A fresh profile each run (playwright passes it as --user-data-dir).
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const result = { origin };
  try {
    const page = await context.newPage();
    page.on('console', (m) => console.log(`page: ${m.text()}`));
    await page.goto(`${origin}/`);
    assert.equal(await page.evaluate(() => typeof window.PouchDB), 'function', 'PouchDB loaded in the page');

    step('the page cannot reach the box before the owner allows its origin');
    result.blocked_before_cors = !(await pageReachesBox(page));
    assert.equal(result.blocked_before_cors, true, 'CORS lets an origin nobody allowed through');
    console.log(`origin ${origin}`);
    const lines = readline.createInterface({ input: process.stdin });
    const it = lines[Symbol.asyncIterator]();
    const go = await it.next();
    assert.equal(go.done, false, 'stdin closed before the origin was allowed');
    lines.close();
    result.reaches_after_cors = await pageReachesBox(page);
    assert.equal(result.reaches_after_cors, true, 'the allowed origin still cannot reach the box');

    step('the box has 20 documents; the page pulls them, writes 10 and pushes them');
    assert.equal((await box('PUT', `/${DB}`)).status, 201);
    for (let i = 0; i < 20; i++) await boxPut(`box-${String(i).padStart(2, '0')}`, { from: 'box', n: i });
    const first = await page.evaluate(
      async ({ url, db, token }) => {
        window.local = new PouchDB('notes-local');
        window.remote = new PouchDB(`${url}/${db}`, { auth: { username: 'browser', password: token } });
        const adapter = window.local.adapter;
        const pull = await window.local.replicate.from(window.remote);
        const docs = [];
        for (let i = 0; i < 10; i++) docs.push({ _id: `page-${String(i).padStart(2, '0')}`, from: 'page', n: i });
        const written = await window.local.bulkDocs(docs);
        const push = await window.local.replicate.to(window.remote);
        return { adapter, pulled: pull.docs_written, written: written.filter((r) => r.ok).length, pushed: push.docs_written };
      },
      { url: BOX, db: DB, token },
    );
    Object.assign(result, first);
    assert.equal(first.adapter, 'idb', 'the page keeps its documents in IndexedDB');
    assert.deepEqual([first.pulled, first.written, first.pushed], [20, 10, 10]);
    assert.equal(Object.keys(await boxDocs()).length, 30);

    step('live sync both ways: a box write reaches the page, a page write reaches the box');
    await page.evaluate(() => {
      window.syncErrors = [];
      window.sync = PouchDB.sync(window.local, window.remote, {
        live: true,
        retry: true,
        // Retry quickly once the network is back (the default backs off to minutes).
        back_off_function: () => 500,
      }).on('error', (e) => window.syncErrors.push(String(e)));
    });
    await boxPut('box-live', { from: 'box', live: true });
    await waitFor('the box write in the page', async () => (await pageDocs(page))['box-live'] !== undefined);
    await page.evaluate(() => window.local.put({ _id: 'page-live', from: 'page', live: true }));
    await waitFor('the page write on the box', async () => (await boxDocs())['page-live'] !== undefined);
    // One document both sides will edit while apart.
    const shared = await boxPut('shared', { v: 'base' });
    await waitFor('the shared document in the page', async () => (await pageDocs(page)).shared?.rev === shared);

    step('offline: the page cannot reach the box, its own writes succeed, the box takes writes too');
    await context.setOffline(true);
    result.reaches_while_offline = await pageReachesBox(page);
    assert.equal(result.reaches_while_offline, false, 'the page still reaches the box while offline');
    const offline = await page.evaluate(async () => {
      const docs = [];
      for (let i = 0; i < 5; i++) docs.push({ _id: `page-offline-${i}`, from: 'page', offline: true });
      const written = await window.local.bulkDocs(docs);
      const s = await window.local.get('shared');
      const edit = await window.local.put({ ...s, v: 'page edit while offline' });
      const p0 = await window.local.get('page-00');
      const removed = await window.local.remove(p0);
      return { ok: written.filter((r) => r.ok).length + (edit.ok ? 1 : 0) + (removed.ok ? 1 : 0), online: navigator.onLine };
    });
    result.offline_local_writes = offline.ok;
    result.navigator_online_while_offline = offline.online;
    assert.equal(offline.ok, 7, 'every local write succeeds offline');
    for (let i = 0; i < 5; i++) await boxPut(`box-offline-${i}`, { from: 'box', offline: true });
    const s = await box('GET', `/${DB}/shared`);
    await boxPut('shared', { ...s.body, v: 'box edit while offline' });
    // The page holds none of them while it is offline, and the box none of the page's.
    const apart = await pageDocs(page);
    result.box_writes_seen_offline = Object.keys(apart).filter((id) => id.startsWith('box-offline-')).length;
    assert.equal(result.box_writes_seen_offline, 0);
    assert.equal(Object.keys(await boxDocs()).filter((id) => id.startsWith('page-offline-')).length, 0);

    step('online again: both sides catch up to the same documents and revisions');
    await context.setOffline(false);
    let last = '';
    await waitFor('both sides to hold the same documents and revisions', async () => {
      const [p, b] = [await pageDocs(page), await boxDocs()];
      last = `page ${JSON.stringify(p)}\nbox  ${JSON.stringify(b)}`;
      // 20 + 10 + 3 live, 5 + 5 written apart, page-00 deleted.
      return canonical(p) === canonical(b) && Object.keys(p).length === 42 && p.shared.conflicts.length === 1;
    }).catch((e) => {
      throw new Error(`${e.message}\n${last}`);
    });
    result.page_docs = await pageDocs(page);
    result.sync_errors = await page.evaluate(() => {
      window.sync.cancel();
      return window.syncErrors;
    });
    console.log(`result ${JSON.stringify(result)}`);
    console.log('all passed');
  } finally {
    await context.close();
    server.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
