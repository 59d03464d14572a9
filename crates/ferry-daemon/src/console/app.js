// Ferry's web console: a single page over the appliance's REST API. The token lives in this
// script's memory only (never in storage or cookies): reloading the page logs out. Every text
// from the API goes into the page as text, never as markup. Running sessions are followed
// through the API's event streams (EventSource), by polling when a stream fails.
'use strict';

const state = { token: null, user: null, role: null, timer: null, stream: null };

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'on') for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
    else if (k === 'class') e.className = v;
    // Through the CSSOM: the policy forbids style attributes.
    else if (k === 'width') e.style.width = v;
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : v);
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(p) {
    super(p.detail || p.title || 'request failed');
    this.status = p.status;
    this.field = p.field;
  }
}

async function api(method, path, body, etag) {
  const h = {};
  if (state.token) h.Authorization = 'Bearer ' + state.token;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  if (etag) h['If-Match'] = etag;
  const r = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let v = null;
  try { v = text ? JSON.parse(text) : null; } catch (_) { v = null; }
  if (!r.ok) {
    if (r.status === 401 && state.token && path !== '/api/login') logout();
    throw new ApiError(v || { status: r.status, detail: 'HTTP ' + r.status });
  }
  return { body: v, etag: r.headers.get('ETag') };
}

function showError(e) {
  const box = $('error');
  if (!e) { box.hidden = true; box.textContent = ''; return; }
  box.hidden = false;
  box.textContent = (e.field ? e.field + ': ' : '') + (e.message || String(e));
}

function guard(f) {
  return async (ev) => {
    if (ev && ev.preventDefault) ev.preventDefault();
    showError(null);
    try { await f(ev); } catch (e) { showError(e); }
  };
}

const bytes = (n) => {
  if (n === null || n === undefined) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
};
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : '—');
const age = (s) => (s === null || s === undefined ? '—' : s < 3600 ? Math.round(s / 60) + ' min' : (s / 3600).toFixed(1) + ' h');
const status = (s) => el('span', { class: 'status-' + s }, s);
const table = (head, rows) => el('table', {}, el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))), el('tbody', {}, rows));
const card = (title, ...kids) => el('section', { class: 'card' }, el('h2', {}, title), ...kids);

function mount(...kids) {
  const m = $('main');
  m.replaceChildren(...kids);
}

// --- Event streams (ADR 0178) -------------------------------------------------------------------

const LIVE = ['queued', 'running', 'retrying'];

function stopFollowing() {
  if (state.stream) state.stream.stop();
  state.stream = null;
}

// Follows the event stream at `path`: `on` maps event names to handlers of their JSON. An
// EventSource cannot send the token, so each connection opens with a 60-second ticket; when
// a connection fails it is opened again with a new ticket from the last event id (the server
// sends what came after it). After 3 failures in a row `fallback()` takes over (polling).
function follow(path, on, fallback, lastId) {
  stopFollowing();
  const s = { es: null, lastId: lastId || null, failures: 0, stopped: false };
  s.stop = () => { s.stopped = true; if (s.es) s.es.close(); };
  state.stream = s;
  const fail = () => {
    if (s.stopped) return;
    s.failures += 1;
    if (s.failures >= 3) { s.stop(); fallback(); return; }
    setTimeout(connect, 500 * s.failures);
  };
  const connect = async () => {
    if (s.stopped) return;
    let t;
    try { t = await api('POST', '/api/events/ticket'); } catch (_) { fail(); return; }
    if (s.stopped) return;
    const q = new URLSearchParams({ ticket: t.body.ticket });
    if (s.lastId) q.set('last_event_id', s.lastId);
    const es = new EventSource(path + '?' + q.toString());
    s.es = es;
    for (const [name, f] of Object.entries(on)) {
      es.addEventListener(name, (ev) => {
        if (s.stopped) return;
        if (ev.lastEventId) s.lastId = ev.lastEventId;
        s.failures = 0;
        if (name === 'end') s.stop();
        f(JSON.parse(ev.data));
      });
    }
    // The browser would reconnect with the old ticket; a new one is asked for instead.
    es.onerror = () => { es.close(); fail(); };
  };
  connect();
}

function logout() {
  stopFollowing();
  if (state.token) fetch('/api/logout', { method: 'POST', headers: { Authorization: 'Bearer ' + state.token } }).catch(() => {});
  state.token = null;
  $('nav').hidden = true;
  $('logout').hidden = true;
  $('who').textContent = '';
  location.hash = '';
  showLogin();
}

function showLogin() {
  const f = el('form', { id: 'login', class: 'card narrow' },
    el('h1', {}, 'Log in'),
    el('label', {}, 'User ', el('input', { name: 'username', autocomplete: 'username', required: true })),
    el('label', {}, 'Password ', el('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true })),
    el('button', { type: 'submit', class: 'primary' }, 'Log in'));
  f.addEventListener('submit', guard(async () => {
    const d = new FormData(f);
    const r = await api('POST', '/api/login', { username: d.get('username'), password: d.get('password') });
    state.token = r.body.token;
    state.user = d.get('username');
    state.role = r.body.role;
    $('nav').hidden = false;
    $('logout').hidden = false;
    $('who').textContent = state.user + ' (' + state.role + ')';
    if (location.hash === '' || location.hash === '#') location.hash = '#dashboard';
    else route();
  }));
  mount(f);
}

// --- Dashboard --------------------------------------------------------------------------------

function chart(repos) {
  const W = 720, H = 200, P = 40;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('class', 'chart');
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('id', 'usage-chart');
  const pts = repos.flatMap((r) => r.samples);
  if (!pts.length) {
    const t = document.createElementNS(svg.namespaceURI, 'text');
    t.setAttribute('x', P); t.setAttribute('y', H / 2);
    t.textContent = 'no usage measured yet: it is measured after each job run';
    svg.append(t);
    return svg;
  }
  const t0 = Math.min(...pts.map((p) => p.time)), t1 = Math.max(...pts.map((p) => p.time), t0 + 1);
  const max = Math.max(...pts.map((p) => p.chunk_bytes), 1);
  const colors = ['#1f6fc5', '#c5461f', '#1b7f3b', '#7a3fb0'];
  const x = (t) => P + ((t - t0) / (t1 - t0)) * (W - 2 * P);
  const y = (b) => H - P + 10 - (b / max) * (H - 2 * P);
  const axis = document.createElementNS(svg.namespaceURI, 'polyline');
  axis.setAttribute('points', `${P},${P - 10} ${P},${H - P + 10} ${W - P},${H - P + 10}`);
  axis.setAttribute('stroke', '#9aa6b2');
  svg.append(axis);
  const lab = (tx, ty, s) => {
    const t = document.createElementNS(svg.namespaceURI, 'text');
    t.setAttribute('x', tx); t.setAttribute('y', ty); t.textContent = s; svg.append(t);
  };
  lab(2, P, bytes(max));
  lab(P, H - 4, new Date(t0 * 1000).toLocaleString());
  repos.forEach((r, i) => {
    const line = document.createElementNS(svg.namespaceURI, 'polyline');
    const ps = r.samples.length === 1 ? [r.samples[0], { ...r.samples[0], time: t1 }] : r.samples;
    line.setAttribute('points', ps.map((p) => `${x(p.time)},${y(p.chunk_bytes)}`).join(' '));
    line.setAttribute('stroke', colors[i % colors.length]);
    svg.append(line);
    const c = r.samples[r.samples.length - 1];
    lab(W - P - 200, P + 14 * i, `${r.name}: ${bytes(c.chunk_bytes)}, ${c.restore_points} restore points`);
  });
  return svg;
}

const onDashboard = () => ['', '#', '#dashboard'].includes(location.hash);

async function dashboard() {
  await drawDashboard();
  // Another page was asked for meanwhile: it follows its own stream.
  if (!onDashboard()) return;
  // Drawn again when a session ends (from the event stream; without it the page stays as is).
  let pending = null;
  follow('/api/events', {
    state: (v) => {
      if (LIVE.includes(v.status) || pending) return;
      pending = setTimeout(() => {
        pending = null;
        if (onDashboard()) drawDashboard().catch(showError);
      }, 500);
    },
  }, () => {});
}

async function drawDashboard() {
  const [vms, sessions, alerts, usage] = await Promise.all([
    api('GET', '/api/vms'), api('GET', '/api/sessions?limit=200'), api('GET', '/api/alerts?limit=200'), api('GET', '/api/usage'),
  ]);
  const now = Date.now() / 1000;
  const day = sessions.body.filter((s) => s.started > now - 86400 && (s.kind || 'backup') === 'backup');
  const failed = day.filter((s) => s.status === 'failed');
  const breaches = alerts.body.filter((a) => a.kind === 'rpo' && a.resolved === null);
  const tile = (id, n, label, bad) => el('div', { class: 'tile' + (bad && n > 0 ? ' bad' : ''), id }, el('div', { class: 'n' }, n), label);
  mount(
    el('h1', {}, 'Dashboard'),
    el('div', { class: 'tiles' },
      tile('tile-vms', vms.body.filter((v) => v.restore_points > 0).length, 'protected VMs'),
      tile('tile-jobs', day.length, 'job runs in the last 24 h'),
      tile('tile-failures', failed.length, 'failed runs (24 h)', true),
      tile('tile-rpo', breaches.length, 'RPO breaches', true)),
    card('Repository usage', chart(usage.body.repositories)),
    card('Protected VMs', table(['VM', 'source', 'last success', 'RPO age', 'restore points', 'failures'],
      vms.body.map((v) => el('tr', {}, el('td', {}, v.vm_name), el('td', {}, v.source), el('td', {}, when(v.last_success)),
        el('td', {}, age(v.rpo_age_seconds)), el('td', {}, v.restore_points), el('td', {}, v.failures))))),
    card('Last 24 hours', sessionTable(day)),
    card('Alerts', table(['time', 'kind', 'what', 'delivered'], alerts.body.slice(0, 20).map((a) => el('tr', {},
      el('td', {}, when(a.time)), el('td', {}, a.kind), el('td', {}, a.title),
      el('td', {}, a.deliveries.map((d) => d.target + (d.ok ? ' ✓' : ' ✗ ' + d.error)).join('; ')))))),
  );
}

// --- Jobs ---------------------------------------------------------------------------------------

async function jobs() {
  const [list, sessions] = await Promise.all([api('GET', '/api/jobs'), api('GET', '/api/sessions?limit=200')]);
  const running = (j) => sessions.body.find((s) => s.job === j && ['queued', 'running', 'retrying'].includes(s.status));
  mount(
    el('h1', {}, 'Jobs'),
    el('button', { id: 'new-job', class: 'primary', on: { click: () => { location.hash = '#job-new'; } } }, 'New job'),
    card('Jobs', table(['name', 'source', 'repository', 'VMs', 'schedule', 'next run', ''], list.body.map((j) => {
      const r = running(j.name);
      return el('tr', { 'data-job': j.name },
        el('td', {}, j.name), el('td', {}, j.source), el('td', {}, j.repository), el('td', {}, (j.vms || []).join(', ')),
        el('td', {}, (j.schedule || 'by hand') + (j.timezone ? ' (' + j.timezone + ')' : '')),
        el('td', {}, j.next_run ? new Date(j.next_run).toLocaleString() : '—'),
        el('td', {},
          el('button', { class: 'run', on: { click: guard(async () => {
            const s = await api('POST', '/api/jobs/' + encodeURIComponent(j.name) + '/run');
            location.hash = '#session/' + s.body.session;
          }) } }, 'Run now'),
          r ? el('button', { class: 'cancel', on: { click: guard(async () => { await api('POST', '/api/sessions/' + r.id + '/cancel'); await jobs(); }) } }, 'Cancel') : null,
          el('button', { class: 'edit', on: { click: () => { location.hash = '#job/' + encodeURIComponent(j.name); } } }, 'Edit')));
    }))),
  );
}

async function jobForm(name) {
  const [sources, repos] = await Promise.all([api('GET', '/api/sources'), api('GET', '/api/repositories')]);
  let job = { vms: [], enabled: true }, etag = null;
  if (name) {
    const r = await api('GET', '/api/jobs/' + encodeURIComponent(name));
    job = r.body; etag = r.etag;
  }
  const opt = (list, cur) => list.map((x) => el('option', { value: x.name, selected: x.name === cur }, x.name));
  const f = el('form', { id: 'job-form', class: 'card' },
    el('h2', {}, name ? 'Edit job ' + name : 'New job'),
    el('label', {}, 'Name', el('input', { name: 'name', value: name || '', readonly: !!name, required: true })),
    el('label', {}, 'Source', el('select', { name: 'source' }, opt(sources.body, job.source))),
    el('label', {}, 'Repository', el('select', { name: 'repository' }, opt(repos.body, job.repository))),
    el('label', {}, 'VMs (names, ids or patterns, comma-separated)', el('input', { name: 'vms', value: (job.vms || []).join(', ') })),
    el('label', {}, 'Schedule (cron; empty: by hand only)', el('input', { name: 'schedule', value: job.schedule || '' })),
    el('label', {}, 'Time zone', el('input', { name: 'timezone', value: job.timezone || '' })),
    el('label', {}, 'Keep last N restore points (empty: keep all)', el('input', { name: 'keep', type: 'number', min: 1, value: job.retention ? job.retention.last || '' : '' })),
    el('label', {}, 'RPO in hours (empty: no RPO alert)', el('input', { name: 'rpo_hours', type: 'number', step: 'any', value: job.rpo_hours || '' })),
    el('label', {}, el('input', { name: 'enabled', type: 'checkbox', checked: job.enabled !== false }), ' enabled'),
    el('button', { type: 'submit', class: 'primary' }, 'Save'),
    el('button', { type: 'button', on: { click: () => { location.hash = '#jobs'; } } }, 'Back'));
  f.addEventListener('submit', guard(async () => {
    const d = new FormData(f);
    const body = {
      source: d.get('source'), repository: d.get('repository'),
      vms: String(d.get('vms')).split(',').map((s) => s.trim()).filter((s) => s),
      enabled: d.get('enabled') !== null,
    };
    for (const k of ['schedule', 'timezone']) if (d.get(k)) body[k] = d.get(k);
    if (d.get('keep')) body.retention = { last: Number(d.get('keep')) };
    if (d.get('rpo_hours')) body.rpo_hours = Number(d.get('rpo_hours'));
    for (const k of ['window', 'retries', 'retry_delay_seconds', 'parallel_vms']) if (job[k] !== undefined) body[k] = job[k];
    if (job.retention && !d.get('keep')) body.retention = job.retention;
    await api('PUT', '/api/jobs/' + encodeURIComponent(d.get('name')), body, etag);
    location.hash = '#jobs';
  }));
  mount(f);
}

// --- Sessions -----------------------------------------------------------------------------------

function sessionRow(s) {
  return el('tr', { 'data-session': s.id },
    el('td', {}, el('a', { href: '#session/' + s.id }, when(s.started))),
    el('td', {}, s.kind === 'restore' ? 'restore (' + (s.restore ? s.restore.kind : '') + ')' : s.job),
    el('td', {}, status(s.status)), el('td', {}, (s.vms || []).map((v) => v.vm_name).join(', ')), el('td', {}, s.started_by || ''));
}

function sessionTable(list) {
  return table(['started', 'what', 'status', 'VMs', 'by'], list.map(sessionRow));
}

// Puts session `v` into the table in `box`: its row replaced in place, or a new row on top.
function putSession(box, v) {
  const body = box.querySelector('tbody');
  if (!body) return;
  const row = sessionRow(v);
  const old = body.querySelector('tr[data-session="' + CSS.escape(v.id) + '"]');
  if (old) old.replaceWith(row);
  else body.prepend(row);
}

async function sessions() {
  const r = await api('GET', '/api/sessions?limit=100');
  const box = card('Sessions', sessionTable(r.body));
  mount(el('h1', {}, 'Sessions'), box);
  const reload = async () => {
    const n = await api('GET', '/api/sessions?limit=100');
    box.querySelector('table').replaceWith(sessionTable(n.body));
  };
  if (location.hash !== '#sessions') return;
  const poll = () => {
    state.timer = setTimeout(async () => {
      if (location.hash !== '#sessions') return;
      try { await reload(); } catch (e) { showError(e); }
      poll();
    }, 2000);
  };
  follow('/api/events', {
    state: (v) => putSession(box, v),
    resync: () => reload().catch(showError),
  }, poll);
}

function vmRow(m) {
  const pct = m.total ? Math.min(100, Math.round((100 * m.done) / m.total)) : (m.status === 'success' ? 100 : 0);
  const split = (t) => t.bottleneck + ' (source ' + Math.round(t.source_pct) + '%, CPU ' + Math.round(t.cpu_pct) + '%, target ' + Math.round(t.target_pct) + '%)';
  return el('tr', { class: 'vm-row', 'data-vm': m.vm_id }, el('td', {}, m.vm_name),
    el('td', {}, status(m.status), m.waiting_for ? el('div', { class: 'waiting' }, 'waiting for ' + m.waiting_for) : null),
    el('td', {}, el('span', { class: 'bar' }, el('span', { width: pct + '%' })), ' ', el('span', { class: 'pct' }, pct + '%'), m.current_disk ? ' ' + m.current_disk : ''),
    el('td', {}, bytes(m.read)), el('td', {}, bytes(m.written)), el('td', { class: 'rate' }, m.rate ? bytes(m.rate) + '/s' : ''),
    el('td', { class: 'eta' }, m.eta_seconds === null || m.eta_seconds === undefined ? '' : m.eta_seconds + ' s'),
    el('td', { class: 'bottleneck' }, m.time_split ? split(m.time_split) : '',
      ...(m.disk_time_splits || []).map((d) => el('div', { class: 'disk-split' }, d.disk + ': ' + split(d)))),
    el('td', {}, m.restore_point || ''));
}

// Updates the cells of a VM's row in place (the row, its bar and the log stay put: no
// flicker); a VM new to the table gets a row.
function putVm(body, m) {
  const fresh = vmRow(m);
  const old = body.querySelector('tr[data-vm="' + CSS.escape(m.vm_id) + '"]');
  if (!old) { body.append(fresh); return; }
  [...fresh.children].forEach((td, i) => {
    const cur = old.children[i];
    if (!cur) { old.append(td); return; }
    if (i === 2) {
      // The bar: only its width and the numbers change.
      cur.querySelector('.bar span').style.width = td.querySelector('.bar span').style.width;
      [...cur.childNodes].slice(1).forEach((n) => n.remove());
      cur.append(...[...td.childNodes].slice(1));
    } else if (cur.textContent !== td.textContent) {
      cur.replaceWith(td);
    }
  });
}

const logLine = (e) => el('div', { 'data-seq': e.seq }, new Date(e.time * 1000).toLocaleTimeString() + ' ' + e.level + ' ' + (e.vm ? '[' + e.vm + '] ' : '') + e.message);

async function session(id) {
  const [s, log] = await Promise.all([api('GET', '/api/sessions/' + id), api('GET', '/api/sessions/' + id + '/log')]);
  const v = s.body;
  const info = v.restore ? Object.entries(v.restore).filter(([, x]) => x !== null).map(([k, x]) => el('div', {}, k + ': ' + (typeof x === 'object' ? JSON.stringify(x) : x))) : [];
  const statusEl = el('span', { id: 'session-status', class: 'status-' + v.status }, v.status);
  const times = el('span', { id: 'session-times' });
  const cancel = el('button', { id: 'cancel-session', on: { click: guard(async () => { await api('POST', '/api/sessions/' + id + '/cancel'); }) } }, 'Cancel');
  const vmsBody = el('tbody', {}, v.vms.map(vmRow));
  const logBox = el('div', { class: 'log', id: 'session-log' }, log.body.map(logLine));
  let lastSeq = log.body.length ? log.body[log.body.length - 1].seq : 0;
  const here = () => location.hash === '#session/' + id;
  const applyView = (x) => {
    statusEl.textContent = x.status;
    statusEl.className = 'status-' + x.status;
    times.textContent = ' · started ' + when(x.started) + (x.ended ? ' · ended ' + when(x.ended) : '') + (x.error ? ' · ' + x.error : '');
    cancel.hidden = !LIVE.includes(x.status);
    for (const m of x.vms || []) putVm(vmsBody, m);
  };
  // Lines come numbered: each goes in once, in order, whichever way it came.
  const addLines = (lines) => {
    const stick = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    for (const e of lines) {
      if (e.seq <= lastSeq) continue;
      logBox.append(logLine(e));
      lastSeq = e.seq;
    }
    if (stick) logBox.scrollTop = logBox.scrollHeight;
  };
  mount(
    el('h1', {}, v.kind === 'restore' ? 'Restore session' : 'Session of job ' + v.job),
    el('p', {}, 'Status: ', statusEl, times),
    cancel,
    info.length ? card('Restore', ...info) : null,
    card('VMs', el('table', {}, el('thead', {}, el('tr', {}, ['VM', 'status', 'progress', 'read', 'written', 'rate', 'ETA', 'bottleneck', 'restore point'].map((h) => el('th', {}, h)))), vmsBody)),
    card('Log', logBox),
  );
  applyView(v);
  if (!LIVE.includes(v.status) || !here()) return;
  // Polling, when the stream cannot be had.
  const poll = () => {
    state.timer = setTimeout(async () => {
      if (!here()) return;
      try {
        const [n, more] = await Promise.all([api('GET', '/api/sessions/' + id), api('GET', '/api/sessions/' + id + '/log?after=' + lastSeq)]);
        addLines(more.body);
        applyView(n.body);
        if (!LIVE.includes(n.body.status)) return;
      } catch (e) { showError(e); }
      poll();
    }, 1000);
  };
  follow('/api/sessions/' + id + '/events', {
    log: (e) => addLines([e]),
    progress: (m) => putVm(vmsBody, m),
    state: applyView,
    resync: applyView,
    end: () => {},
  }, poll, String(lastSeq));
}

// --- Restore ------------------------------------------------------------------------------------

async function vms() {
  const r = await api('GET', '/api/vms');
  mount(el('h1', {}, 'Restore'), card('VMs with restore points', table(['VM', 'source', 'restore points', 'last success'],
    r.body.map((v) => el('tr', {}, el('td', {}, el('a', { href: '#vm/' + encodeURIComponent(v.vm_name) }, v.vm_name)),
      el('td', {}, v.source), el('td', {}, v.restore_points), el('td', {}, when(v.last_success)))))));
}

async function vm(name) {
  const [pts, sources] = await Promise.all([api('GET', '/api/vms/' + encodeURIComponent(name) + '/restore-points'), api('GET', '/api/sources')]);
  const start = async (body) => {
    const s = await api('POST', '/api/restores', body);
    location.hash = '#session/' + s.body.session;
  };
  mount(el('h1', {}, 'Restore points of ' + name), card('Restore points', table(['time', 'repository', 'disks', 'restore'],
    pts.body.map((p) => {
      const base = { repository: p.repository, restore_point: p.id };
      const src = el('select', { class: 'restore-source' }, sources.body.map((s) => el('option', { value: s.name }, s.name)));
      const vmName = el('input', { class: 'restore-name', placeholder: 'new VM name', value: p.vm_name + ' (restored)' });
      const path = el('input', { class: 'restore-path', placeholder: '/absolute/path/of/new/file.raw' });
      return el('tr', { 'data-restore-point': p.id },
        el('td', {}, when(p.time)), el('td', {}, p.repository), el('td', {}, p.disks.map((d) => d.name + ' ' + bytes(d.size)).join(', ')),
        el('td', {},
          el('div', {}, src, vmName, el('button', { class: 'restore-vm primary', on: { click: guard(() => start({ ...base, kind: 'vm', source: src.value, name: vmName.value })) } }, 'Restore VM')),
          el('div', {}, path, el('button', { class: 'restore-disk', on: { click: guard(() => start({ ...base, kind: 'disk', disk: p.disks[0].name, path: path.value })) } }, 'Restore disk to file')),
          el('div', {}, el('button', { class: 'restore-export', on: { click: guard(() => start({ ...base, kind: 'export', disk: p.disks[0].name })) } }, 'Export over NBD'))));
    }))));
}

// --- Sources and repositories --------------------------------------------------------------------

async function sources() {
  const r = await api('GET', '/api/sources');
  const f = el('form', { id: 'source-form', class: 'card' },
    el('h2', {}, 'Add a source'),
    el('label', {}, 'Name', el('input', { name: 'name', required: true })),
    el('label', {}, 'Kind', el('select', { name: 'kind' }, ['xen', 'vmware'].map((k) => el('option', { value: k }, k)))),
    el('label', {}, 'URL', el('input', { name: 'url', required: true })),
    el('label', {}, 'User', el('input', { name: 'username' })),
    el('label', {}, 'Password', el('input', { name: 'password', type: 'password' })),
    el('label', {}, 'TLS fingerprint (sha256:…)', el('input', { name: 'tls_fingerprint' })),
    el('label', {}, 'More settings (JSON object, optional)', el('textarea', { name: 'extra' })),
    el('button', { type: 'submit', class: 'primary' }, 'Test and save'));
  f.addEventListener('submit', guard(async () => {
    const d = new FormData(f);
    let body = {};
    if (String(d.get('extra')).trim()) {
      try { body = JSON.parse(d.get('extra')); } catch (e) { throw new ApiError({ field: 'extra', detail: 'not JSON: ' + e.message }); }
    }
    for (const k of ['kind', 'url', 'username', 'password', 'tls_fingerprint']) if (d.get(k)) body[k] = d.get(k);
    const name = encodeURIComponent(d.get('name'));
    // Log in first: a source that refuses is not saved.
    await api('POST', '/api/sources/' + name + '/test', body);
    await api('PUT', '/api/sources/' + name, body);
    await sources();
  }));
  mount(el('h1', {}, 'Sources'), card('Sources', table(['name', 'kind', 'URL', 'user', ''], r.body.map((s) => el('tr', { 'data-source': s.name },
    el('td', {}, s.name), el('td', {}, s.kind), el('td', {}, s.url), el('td', {}, s.username || ''),
    el('td', {}, el('button', { on: { click: guard(async () => {
      const t = await api('POST', '/api/sources/' + encodeURIComponent(s.name) + '/test');
      showError({ message: 'source ' + s.name + ': logged in, ' + t.body.vms + ' VMs' });
    }) } }, 'Test')))))), f);
}

async function repositories() {
  const r = await api('GET', '/api/repositories');
  const f = el('form', { id: 'repository-form', class: 'card' },
    el('h2', {}, 'Add a repository'),
    el('label', {}, 'Name', el('input', { name: 'name', required: true })),
    el('label', {}, 'URL (path, s3://…, az://…)', el('input', { name: 'url', required: true })),
    el('label', {}, 'Password', el('input', { name: 'password', type: 'password' })),
    el('label', {}, el('input', { name: 'init', type: 'checkbox' }), ' create a new repository there'),
    el('button', { type: 'submit', class: 'primary' }, 'Save'));
  f.addEventListener('submit', guard(async () => {
    const d = new FormData(f);
    const body = { url: d.get('url'), init: d.get('init') !== null };
    if (d.get('password')) body.password = d.get('password');
    await api('PUT', '/api/repositories/' + encodeURIComponent(d.get('name')), body);
    await repositories();
  }));
  mount(el('h1', {}, 'Repositories'), card('Repositories', table(['name', 'URL'], r.body.map((x) => el('tr', { 'data-repository': x.name },
    el('td', {}, x.name), el('td', {}, x.url))))), f);
}

async function health() {
  const [h, targets] = await Promise.all([api('GET', '/health'), api('GET', '/api/alert-targets')]);
  mount(el('h1', {}, 'Health'),
    card('Appliance', el('div', { id: 'health-status' }, 'status: ' + h.body.status), el('div', {}, 'version ' + h.body.version),
      el('div', {}, 'sessions running: ' + h.body.sessions_running), el('div', { class: 'muted' }, 'certificate ' + (h.body.tls_fingerprint || ''))),
    card('Alert targets', table(['name', 'kind', 'events', 'enabled'], targets.body.map((t) => el('tr', {},
      el('td', {}, t.name), el('td', {}, t.kind), el('td', {}, (t.events || ['failure', 'rpo']).join(', ')), el('td', {}, t.enabled === false ? 'no' : 'yes'))))));
}

// --- Replicas -----------------------------------------------------------------------------------

async function replicas() {
  clearTimeout(state.timer);
  const [list, sources, repos] = await Promise.all([api('GET', '/api/replicas'), api('GET', '/api/sources'), api('GET', '/api/repositories')]);
  const path = (n, a) => '/api/replicas/' + encodeURIComponent(n) + (a ? '/' + a : '');
  const act = (n, a, body) => guard(async () => { await api('POST', path(n, a), body); await replicas(); });
  const busy = list.body.some((r) => r.action && r.action.ended === null);
  const rows = list.body.map((r) => {
    const s = r.status || {};
    const failedOver = s.state === 'failed-over';
    const point = el('select', { class: 'replica-point' }, (s.points || []).slice().reverse().map((p) => el('option', { value: p.id }, when(p.time) + ' · ' + p.restore_point)));
    const a = r.action;
    return el('tr', { 'data-replica': r.name },
      el('td', {}, r.name), el('td', {}, s.vm_name || (r.config ? r.config.vm : '')),
      el('td', {}, (s.source || (r.config || {}).source || '') + ' → ' + (s.target || (r.config || {}).to_source || '')),
      el('td', { class: 'replica-state' }, r.status ? status(s.state) : 'no cycle yet', s.test_vm ? el('div', {}, 'test copy running') : null,
        s.unfinished ? el('div', { class: 'waiting' }, 'unfinished: ' + s.unfinished.kind) : null),
      el('td', { class: s.rpo_breached ? 'status-failed' : '' }, age(s.lag_seconds), s.rpo_seconds ? ' (RPO ' + age(s.rpo_seconds) + ')' : ''),
      el('td', {}, when(s.last_success)), el('td', {}, bytes(s.last_bytes)), el('td', { class: 'points' }, (s.points || []).length),
      el('td', {}, s.last_error || ''),
      el('td', { class: 'replica-action' }, a ? a.action + ' by ' + a.by + ': ' + (a.ended === null ? 'running' : a.error ? 'failed: ' + a.error : 'done') : ''),
      el('td', {},
        failedOver ? el('button', { class: 'reverse', on: { click: act(r.name, 'reverse') } }, 'Reverse') : el('button', { class: 'sync', on: { click: act(r.name, 'sync') } }, 'Sync now'),
        s.test_vm ? el('button', { class: 'test-cleanup', on: { click: act(r.name, 'test/cleanup') } }, 'Clean up test')
          : el('button', { class: 'test', on: { click: guard(async () => { await api('POST', path(r.name, 'test'), point.value ? { point: point.value } : {}); await replicas(); }) } }, 'Test failover'),
        failedOver ? null : el('span', {}, point,
          el('button', { class: 'failover', on: { click: guard(async () => { await api('POST', path(r.name, 'failover'), point.value ? { point: point.value } : {}); await replicas(); }) } }, 'Failover to point'),
          el('button', { class: 'planned', on: { click: act(r.name, 'failover', { planned: true }) } }, 'Planned failover')),
        r.config ? el('button', { class: 'delete', on: { click: guard(async () => {
          const g = await api('GET', path(r.name));
          await api('DELETE', path(r.name), undefined, g.etag);
          await replicas();
        }) } }, 'Delete') : null));
  });
  const opt = (xs) => xs.map((x) => el('option', { value: x.name }, x.name));
  const f = el('form', { id: 'replica-form', class: 'card' },
    el('h2', {}, 'New replica'),
    el('label', {}, 'Name', el('input', { name: 'name', required: true })),
    el('label', {}, 'Source of the VM', el('select', { name: 'source' }, opt(sources.body))),
    el('label', {}, 'VM (name or id)', el('input', { name: 'vm', required: true })),
    el('label', {}, 'Standby on source', el('select', { name: 'to_source' }, opt(sources.body))),
    el('label', {}, 'Repository', el('select', { name: 'repository' }, opt(repos.body))),
    el('label', {}, 'Every (30s, 5m, 1h)', el('input', { name: 'every', value: '5m' })),
    el('label', {}, 'Recovery points kept', el('input', { name: 'keep', type: 'number', min: 1, value: 4 })),
    el('label', {}, 'RPO (empty: twice the interval)', el('input', { name: 'rpo' })),
    el('label', {}, el('input', { name: 'enabled', type: 'checkbox', checked: true }), ' cycles on schedule'),
    el('button', { type: 'submit', class: 'primary' }, 'Save'));
  f.addEventListener('submit', guard(async () => {
    const d = new FormData(f);
    const body = { source: d.get('source'), vm: d.get('vm'), to_source: d.get('to_source'), repository: d.get('repository'),
      every: d.get('every'), keep: Number(d.get('keep')), enabled: d.get('enabled') !== null };
    if (d.get('rpo')) body.rpo = d.get('rpo');
    await api('PUT', path(d.get('name')), body);
    await replicas();
  }));
  mount(el('h1', {}, 'Replicas'),
    card('Replicas', table(['name', 'VM', 'direction', 'state', 'lag', 'last success', 'last cycle', 'points', 'last error', 'action', ''], rows)), f);
  if (busy) state.timer = setTimeout(() => { if (location.hash === '#replicas') replicas().catch(showError); }, 1000);
}

// --- Routing ------------------------------------------------------------------------------------

const routes = [
  [/^#?$/, dashboard], [/^#dashboard$/, dashboard], [/^#jobs$/, jobs], [/^#job-new$/, () => jobForm(null)],
  [/^#job\/(.+)$/, (m) => jobForm(decodeURIComponent(m[1]))], [/^#sessions$/, sessions], [/^#session\/(.+)$/, (m) => session(m[1])],
  [/^#vms$/, vms], [/^#vm\/(.+)$/, (m) => vm(decodeURIComponent(m[1]))], [/^#sources$/, sources],
  [/^#repositories$/, repositories], [/^#replicas$/, replicas], [/^#health$/, health],
];

async function route() {
  clearTimeout(state.timer);
  stopFollowing();
  if (!state.token) { showLogin(); return; }
  showError(null);
  const h = location.hash;
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', h.startsWith(a.getAttribute('href')));
  for (const [re, f] of routes) {
    const m = h.match(re);
    if (m) { try { await f(m); } catch (e) { showError(e); } return; }
  }
  mount(el('p', {}, 'No such page.'));
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => {
  $('logout').addEventListener('click', logout);
  showLogin();
});
