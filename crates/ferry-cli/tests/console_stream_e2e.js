// The console follows running sessions from the API's event streams, in headless Chromium
// (Debian's `chromium`, driven by the npm package playwright-core): the Sessions list gets a
// run's row and its states without reloading; the session page's bar moves while a
// throttled backup runs, updated in place (the VM's row stays the same element) from the
// stream with no polling, and its log ends with every line once, in order. With the streams
// blocked the page falls back to polling and still ends complete.
//
// Usage: node console_stream_e2e.js  with FERRY_URL, FERRY_USER, FERRY_PASSWORD, FERRY_JOB and
// FERRY_JOB2 (throttled jobs of one VM each, not run yet), FERRY_SHOTS (a directory) and FERRY_PROFILE (a fresh Chromium
// profile directory) set. Prints one JSON line: {"ok": true, ...} or exits non-zero with the
// reason.
'use strict';
const { env, launch, watchProblems } = require('./console_common.js');
const path = require('path');

const LIVE = ['queued', 'running', 'retrying'];

async function main() {
  const url = env('FERRY_URL');
  const job = env('FERRY_JOB');
  const ctx = await launch();
  // Counts the page's EventSources and the events they deliver.
  await ctx.addInitScript(() => {
    const Base = window.EventSource;
    window.__es = { opened: 0, events: 0, last: null };
    window.EventSource = class extends Base {
      constructor(u, o) {
        super(u, o);
        window.__es.opened += 1;
        window.__es.last = this;
        for (const n of ['log', 'progress', 'state', 'resync', 'end']) this.addEventListener(n, () => { window.__es.events += 1; });
      }
    };
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  const problems = watchProblems(page);
  const requests = [];
  page.on('request', (r) => requests.push({ method: r.method(), path: new URL(r.url()).pathname + new URL(r.url()).search }));
  const gets = (p) => requests.filter((r) => r.method === 'GET' && r.path === p).length;

  await page.goto(url + '/');
  await page.fill('#login input[name=username]', env('FERRY_USER'));
  await page.fill('#login input[name=password]', env('FERRY_PASSWORD'));
  await page.click('#login button[type=submit]');
  await page.waitForSelector('#tile-vms');

  const run = async (j) => page.evaluate(async (n) => (await api('POST', '/api/jobs/' + n + '/run')).body.session, j);

  // The session page of a run (the VM's first: a full read), followed while it runs.
  const followed = await run(job);
  await page.evaluate((i) => { location.hash = '#session/' + i; }, followed);
  await page.waitForSelector('tr.vm-row .bar span');
  const started = requests.length;
  await page.evaluate(() => { document.querySelector('tr.vm-row').dataset.mark = 'first'; });
  const widths = [];
  let shot = null;
  for (let i = 0; i < 600; i++) {
    const s = await page.textContent('#session-status');
    const w = await page.evaluate(() => document.querySelector('tr.vm-row .bar span').style.width);
    if (LIVE.includes(s) && !widths.includes(w)) widths.push(w);
    if (!shot && LIVE.includes(s) && parseInt(w, 10) > 20) {
      shot = path.join(env('FERRY_SHOTS'), 'session-streamed.png');
      await page.screenshot({ path: shot, fullPage: true });
    }
    if (!LIVE.includes(s)) break;
    await page.waitForTimeout(100);
  }
  const final = await page.textContent('#session-status');
  if (final !== 'success') throw new Error(`the run ended ${final}: ${await page.textContent('main')}`);
  const moving = widths.filter((w) => w !== '100%');
  if (moving.length < 3) throw new Error(`the bar did not move while the backup ran: ${widths}`);
  await page.waitForFunction(() => [...document.querySelectorAll('.pct')].some((e) => e.textContent === '100%'));
  if ((await page.evaluate(() => document.querySelector('tr.vm-row').dataset.mark)) !== 'first') {
    throw new Error('the VM row was drawn anew instead of updated in place');
  }
  const during = requests.slice(started);
  const polled = during.filter((r) => r.method === 'GET' && r.path.startsWith('/api/sessions/' + followed) && !r.path.includes('/events'));
  if (polled.length) throw new Error('the session page polled while its stream worked: ' + JSON.stringify(polled));
  const streamed = await page.evaluate(() => window.__es.events);
  const logOk = async (sid) => page.evaluate(async (i) => {
    const want = (await api('GET', '/api/sessions/' + i + '/log')).body.map((e) => e.seq);
    const have = [...document.querySelectorAll('#session-log div[data-seq]')].map((d) => Number(d.dataset.seq));
    return JSON.stringify(want) === JSON.stringify(have) ? null : { want, have };
  }, sid);
  let bad = await logOk(followed);
  if (bad) throw new Error('the streamed log is not every line once in order: ' + JSON.stringify(bad));

  // The Sessions list: a run started elsewhere shows up and ends there by itself.
  await page.click('nav a[href="#sessions"]');
  await page.waitForFunction(() => {
    const l = window.__es.last;
    return l && l.readyState === 1 && l.url.includes('/api/events?') && location.hash === '#sessions';
  });
  // The stream opens with a resync, which reloads the list once (it covers the moment
  // between the first load and the stream); from then on rows change in place.
  for (let i = 0; i < 100 && gets('/api/sessions?limit=100') < 2; i++) await page.waitForTimeout(100);
  const listLoads = gets('/api/sessions?limit=100');
  if (listLoads !== 2) throw new Error(`the Sessions list was loaded ${listLoads} times before the run`);
  const listed = await run(job);
  await page.waitForSelector(`tr[data-session="${listed}"]`, { timeout: 30000 });
  await page.waitForFunction((i) => document.querySelector(`tr[data-session="${i}"] .status-success`), listed, { timeout: 60000 });
  if (gets('/api/sessions?limit=100') !== listLoads) throw new Error('the Sessions list was reloaded rather than updated from the stream');

  // Streams blocked: the page polls and still ends complete.
  await page.route(/\/events\?/, (r) => r.abort());
  const polledId = await run(env('FERRY_JOB2'));
  await page.evaluate((i) => { location.hash = '#session/' + i; }, polledId);
  await page.waitForFunction(() => document.getElementById('session-status')?.textContent === 'success', null, { timeout: 90000 });
  if (gets('/api/sessions/' + polledId) < 2) throw new Error('no polling without the stream');
  await page.waitForFunction(() => [...document.querySelectorAll('.pct')].some((e) => e.textContent === '100%'));
  bad = await logOk(polledId);
  if (bad) throw new Error('the polled log is not every line once in order: ' + JSON.stringify(bad));

  await ctx.close();
  if (problems.length) throw new Error(problems.join('\n'));
  process.stdout.write(JSON.stringify({ ok: true, widths, streamed, shot }) + '\n');
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e) + '\n');
  process.exit(1);
});
