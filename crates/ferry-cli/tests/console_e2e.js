// The web console end to end in headless Chromium (Debian's `chromium`, driven by the npm
// package playwright-core): an administrator logs in, adds the Xen simulator as a source (a
// refused login first), a local repository, a job (a cron expression that never fires and a
// job without VMs first), runs it, watches its progress and restores the VM onto the source;
// then replicates it from the Replicas page.
// Each step's screenshot is checked: it is not blank and its page shows the expected text.
//
// Usage: node console_e2e.js  with FERRY_URL, FERRY_USER, FERRY_PASSWORD, FERRY_SIM (the
// simulator's JSON line), FERRY_SOURCE_EXTRA (JSON), FERRY_REPO (a directory path),
// FERRY_SHOTS (a directory) and FERRY_PROFILE (a fresh Chromium profile directory) set.
// Prints one JSON line: {"ok": true, "shots": [...]} or exits non-zero with the reason.
'use strict';
const { env, launch, watchProblems } = require('./console_common.js');
const fs = require('fs');
const path = require('path');

async function main() {
  const url = env('FERRY_URL');
  const sim = JSON.parse(env('FERRY_SIM'));
  const shotsDir = env('FERRY_SHOTS');
  const ctx = await launch();
  const page = ctx.pages()[0] || (await ctx.newPage());
  const problems = watchProblems(page);
  const shots = [];
  const checker = await ctx.newPage();

  // A screenshot, checked: the page shows `text`, and the image has real content (many colours,
  // not one flat background).
  async function shot(name, text) {
    await page.waitForFunction((t) => document.body.innerText.includes(t), text, { timeout: 30000 });
    const file = path.join(shotsDir, name + '.png');
    const png = await page.screenshot({ path: file, fullPage: true });
    const colours = await checker.evaluate(async (b64) => {
      const img = new Image();
      img.src = 'data:image/png;base64,' + b64;
      await img.decode();
      const c = document.createElement('canvas');
      c.width = img.width; c.height = img.height;
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      const seen = new Set();
      for (let i = 0; i < d.length; i += 4 * 7) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      return seen.size;
    }, png.toString('base64'));
    if (colours < 16) throw new Error(`screenshot ${name} looks blank (${colours} colours)`);
    shots.push({ name, file, colours, text });
  }

  const errorShows = async (needle) => {
    await page.waitForFunction((n) => {
      const e = document.getElementById('error');
      return !e.hidden && e.textContent.includes(n);
    }, needle, { timeout: 30000 });
  };

  // Log in (a wrong password first).
  await page.goto(url + '/');
  await page.fill('#login input[name=username]', env('FERRY_USER'));
  await page.fill('#login input[name=password]', 'wrong');
  await page.click('#login button[type=submit]');
  await errorShows('wrong user name or password');
  await page.fill('#login input[name=password]', env('FERRY_PASSWORD'));
  await page.click('#login button[type=submit]');
  await shot('01-dashboard-empty', 'protected VMs');

  // A source that refuses the login is not saved; then the right password.
  await page.click('nav a[href="#sources"]');
  await page.waitForSelector('#source-form');
  const fillSource = async (pw) => {
    await page.fill('#source-form input[name=name]', 'lab');
    await page.selectOption('#source-form select[name=kind]', 'xen');
    await page.fill('#source-form input[name=url]', sim.url);
    await page.fill('#source-form input[name=username]', sim.username);
    await page.fill('#source-form input[name=password]', pw);
    await page.fill('#source-form input[name=tls_fingerprint]', sim.tls_fingerprint);
    await page.fill('#source-form textarea[name=extra]', env('FERRY_SOURCE_EXTRA'));
    await page.click('#source-form button[type=submit]');
  };
  await fillSource('not the password');
  await errorShows('connection: source `lab`');
  await shot('02-source-refused', 'connection: source `lab`');
  if (await page.$('tr[data-source=lab]')) throw new Error('a source that refused the login was saved');
  await fillSource(sim.password);
  await page.waitForSelector('tr[data-source=lab]');
  await shot('03-sources', sim.url);

  // A local repository, created.
  await page.click('nav a[href="#repositories"]');
  await page.fill('#repository-form input[name=name]', 'local');
  await page.fill('#repository-form input[name=url]', env('FERRY_REPO'));
  await page.fill('#repository-form input[name=password]', 'repo password');
  await page.check('#repository-form input[name=init]');
  await page.click('#repository-form button[type=submit]');
  await page.waitForSelector('tr[data-repository=local]');

  // A job: refused while its cron never fires or it names no VM, then saved.
  await page.click('nav a[href="#jobs"]');
  await page.click('#new-job');
  await page.waitForSelector('#job-form');
  await page.fill('#job-form input[name=name]', 'nightly');
  await page.selectOption('#job-form select[name=source]', 'lab');
  await page.selectOption('#job-form select[name=repository]', 'local');
  await page.fill('#job-form input[name=vms]', '');
  await page.click('#job-form button[type=submit]');
  await errorShows('vms');
  await page.fill('#job-form input[name=vms]', 'debian-web');
  await page.fill('#job-form input[name=schedule]', '0 0 30 2 *');
  await page.click('#job-form button[type=submit]');
  await errorShows('never fires');
  await shot('04-job-never-fires', 'never fires');
  await page.fill('#job-form input[name=schedule]', '0 22 * * *');
  await page.fill('#job-form input[name=timezone]', 'Europe/Berlin');
  await page.fill('#job-form input[name=keep]', '3');
  await page.click('#job-form button[type=submit]');
  await page.waitForSelector('tr[data-job=nightly]');
  await shot('05-jobs', '0 22 * * *');

  // Run it and watch: the session page follows the progress until the end.
  await page.click('tr[data-job=nightly] button.run');
  await page.waitForSelector('#session-status');
  const seen = new Set();
  for (let i = 0; i < 600; i++) {
    const s = await page.textContent('#session-status');
    seen.add(s);
    if (['success', 'failed', 'cancelled', 'warning'].includes(s)) break;
    await page.waitForTimeout(100);
  }
  const final = await page.textContent('#session-status');
  if (final !== 'success') throw new Error(`the job's session ended ${final}: ${await page.textContent('main')}`);
  await page.waitForFunction(() => [...document.querySelectorAll('.pct')].some((e) => e.textContent === '100%'));
  await shot('06-session', 'restore point');

  // Restore the VM onto the source from its restore points.
  await page.click('nav a[href="#vms"]');
  await page.click('a[href="#vm/debian-web"]');
  await page.waitForSelector('button.restore-vm');
  await page.fill('input.restore-name', 'web-from-console');
  await shot('07-restore-points', 'Restore VM');
  await page.click('button.restore-vm');
  await page.waitForSelector('#session-status');
  await page.waitForFunction(() => !['queued', 'running', 'retrying'].includes(document.getElementById('session-status')?.textContent),
    null, { timeout: 120000 });
  const rs = await page.textContent('#session-status');
  if (rs !== 'success') throw new Error(`the restore ended ${rs}: ${await page.textContent('main')}`);
  await shot('08-restore-session', 'web-from-console');

  // The dashboard now: one protected VM, one run, the usage chart drawn.
  await page.click('nav a[href="#dashboard"]');
  // A single sample draws a flat line, which has no height to be "visible".
  await page.waitForSelector('#usage-chart polyline:nth-of-type(2)', { state: 'attached' });
  const vms = await page.textContent('#tile-vms .n');
  if (vms !== '1') throw new Error(`dashboard shows ${vms} protected VMs`);
  await shot('09-dashboard', 'Repository usage');
  await page.click('nav a[href="#health"]');
  await shot('10-health', 'status: ok');

  // A replica of the VM (onto the same source: the simulator is the only one), synced by hand;
  // the page follows the action until the recovery point is there.
  await page.click('nav a[href="#replicas"]');
  await page.waitForSelector('#replica-form');
  await page.fill('#replica-form input[name=name]', 'web');
  await page.selectOption('#replica-form select[name=source]', 'lab');
  await page.fill('#replica-form input[name=vm]', 'debian-web');
  await page.selectOption('#replica-form select[name=to_source]', 'lab');
  await page.selectOption('#replica-form select[name=repository]', 'local');
  await page.fill('#replica-form input[name=every]', '1h');
  await page.uncheck('#replica-form input[name=enabled]');
  await page.click('#replica-form button[type=submit]');
  await page.click('tr[data-replica=web] button.sync');
  await page.waitForFunction(() => (document.querySelector('tr[data-replica=web] .replica-action') || {}).textContent === 'sync by admin: done',
    null, { timeout: 120000 });
  const points = await page.textContent('tr[data-replica=web] .points');
  if (points !== '1') throw new Error(`the replica shows ${points} recovery points: ${await page.textContent('main')}`);
  await shot('11-replicas', 'replicating');

  await ctx.close();
  if (problems.length) throw new Error(problems.join('\n'));
  process.stdout.write(JSON.stringify({ ok: true, states_seen: [...seen], shots }) + '\n');
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e) + '\n');
  process.exit(1);
});
