// Conveyor dashboard: a dependency-free single-page app over the JSON API. Each view renders
// a static frame once (filters keep their focus) and refreshes its data area every 2 s.
'use strict';

const REFRESH_MS = 2000;
const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const num = (n) => (n ?? 0).toLocaleString();
const pill = (s) => `<span class="pill ${esc(s)}">${esc(String(s).replace('_', ' '))}</span>`;

async function api(path, opts = {}) {
  const res = await fetch(path, {
    credentials: 'same-origin',
    ...opts,
    headers: { 'X-Conveyor-Dashboard': '1', ...(opts.body ? { 'Content-Type': 'application/json' } : {}), ...(opts.headers || {}) },
  });
  if (res.status === 401) { location.href = '/dashboard/login'; throw new Error('sign in required'); }
  const body = await res.json().catch(() => ({}));
  if (!body.success) throw new Error(body.error?.message || `${res.status} ${res.statusText}`);
  return body;
}
const post = (path) => api(path, { method: 'POST' });

function ago(ms) {
  if (!ms) return '—';
  const s = Math.round((Date.now() - ms) / 1000);
  const rel = s < 0 ? `in ${fmtDur(-s)}` : `${fmtDur(s)} ago`;
  return `<span title="${esc(new Date(ms).toISOString())}">${rel}</span>`;
}
function fmtDur(s) {
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}
const ms = (v) => (v == null ? '—' : v < 1000 ? `${Math.round(v * 10) / 10} ms` : `${(v / 1000).toFixed(2)} s`);

function toast(msg) {
  const t = $('#toast');
  t.textContent = msg;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 3500);
}

async function act(path, confirmText, done) {
  if (confirmText && !confirm(confirmText)) return;
  try {
    await post(path);
    toast(done);
    refresh();
  } catch (e) {
    toast(`Failed: ${e.message}`);
  }
}
window.act = act;

function table(cols, rows, empty = 'Nothing here yet.') {
  if (!rows.length) return `<p class="muted">${empty}</p>`;
  const head = cols.map((c) => `<th class="${c.num ? 'num' : ''}">${esc(c.title)}</th>`).join('');
  const body = rows.map((r) => `<tr>${cols.map((c) => `<td class="${c.num ? 'num' : ''}">${c.cell(r)}</td>`).join('')}</tr>`).join('');
  return `<div class="table-wrap"><table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table></div>`;
}

function stat(label, value, sub = '') {
  return `<div class="card stat"><div class="label">${esc(label)}</div><div class="value" data-stat="${esc(label)}">${value}</div><div class="sub">${sub}</div></div>`;
}

// Bars over the whole period (empty minutes are zero), `per` minutes each; the bar's value
// is the sum (counts) or the maximum (latencies) of its minutes.
function chart(points, key, { bad = false, period = 'hour', sum = true, fmt = (v) => num(Math.round(v)) } = {}) {
  const per = period === 'day' ? 30 : 1, span = period === 'day' ? 1440 : 60, bars = span / per;
  const now = Math.floor(Date.now() / 60000) * 60000, start = now - (span - 1) * 60000;
  const vals = new Array(bars).fill(0);
  for (const p of points) {
    const i = Math.floor((p.minute - start) / 60000 / per);
    if (i < 0 || i >= bars) continue;
    vals[i] = sum ? vals[i] + (p[key] || 0) : Math.max(vals[i], p[key] || 0);
  }
  const top = Math.max(...vals, 1), w = 600, h = 120, bw = w / bars;
  const rects = vals.map((v, i) => v > 0
    ? `<rect x="${(i * bw + 0.5).toFixed(1)}" y="${(h - (v / top) * h).toFixed(1)}" width="${Math.max(bw - 1, 1).toFixed(1)}" height="${((v / top) * h).toFixed(1)}"><title>${esc(fmt(v))}</title></rect>` : '').join('');
  const t = (m) => new Date(m).toTimeString().slice(0, 5);
  return `<div class="chart-box"><div class="chart-top muted">${esc(fmt(top))}</div>
    <svg class="chart ${bad ? 'bad' : ''}" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" role="img">${rects}</svg>
    <div class="chart-axis muted"><span>${t(start)}</span><span>${t(now)}</span></div></div>`;
}

function pager(meta, page) {
  const pages = Math.max(1, Math.ceil(meta.total / meta.per_page));
  return `<div class="filters"><span class="muted">${num(meta.total)}${meta.total_capped ? "+" : ""} total · page ${meta.page} of ${pages}</span>
    <button ${meta.page <= 1 ? 'disabled' : ''} onclick="go({page:${meta.page - 1}})">Previous</button>
    <button ${meta.page >= pages ? 'disabled' : ''} onclick="go({page:${meta.page + 1}})">Next</button></div>`;
}

// --- routing -------------------------------------------------------------------------------

function route() {
  const [path, query] = (location.hash.slice(1) || '/').split('?');
  return { parts: path.split('/').filter(Boolean), params: new URLSearchParams(query || '') };
}
window.go = (changes) => {
  const { parts, params } = route();
  for (const [k, v] of Object.entries(changes)) (v === '' || v == null ? params.delete(k) : params.set(k, v));
  location.hash = `#/${parts.join('/')}${params.toString() ? '?' + params : ''}`;
};

const views = {
  '': overview, metrics, jobs, failed, batches, queues, events, workflows: workflow, orders, notifications,
};

let current = null;
async function refresh() {
  if (!current) return;
  try {
    const html = await current.data(route());
    const area = $('#data');
    if (area) area.innerHTML = html;
  } catch (e) {
    const area = $('#data');
    if (area) area.innerHTML = `<p class="muted">Could not load: ${esc(e.message)}</p>`;
  }
}

function render() {
  const { parts, params } = route();
  const name = parts[0] || '';
  const view = (views[name] || overview)(parts, params);
  current = view;
  document.querySelectorAll('#nav a').forEach((a) => a.classList.toggle('active', a.getAttribute('href') === `#/${name}`));
  $('#view').innerHTML = `${view.frame || ''}<div id="data"><p class="muted">Loading…</p></div>`;
  refresh();
}

async function status() {
  try {
    const res = await fetch('/api/health', { credentials: 'same-origin' });
    const body = await res.json();
    const st = body.data?.status || 'down';
    $('#status').className = `pill ${st}`;
    $('#status').textContent = st;
  } catch {
    $('#status').className = 'pill down';
    $('#status').textContent = 'down';
  }
}

// --- views ---------------------------------------------------------------------------------

function overview() {
  return {
    frame: '<h1>Overview</h1>',
    async data() {
      const [stats, queues, workers, breakers, kinds, keys] = await Promise.all([api('/api/stats'), api('/api/queues'), api('/api/workers'), api('/api/breakers'), api('/api/kinds'), api('/api/concurrency')]);
      const s = stats.data;
      const wait = s.queues.max_wait ? `${s.queues.max_wait.seconds.toFixed(1)} s` : '0 s';
      let html = `<div class="grid">
        ${stat('Jobs per minute', num(s.queues.per_minute))}
        ${stat('Jobs past hour', num(s.past_hour.processed), `${num(s.past_hour.failed)} failed · p95 ${ms(s.past_hour.p95_runtime_ms)}`)}
        ${stat('Failed past 7 days', num(s.queues.failed_7d), `${num(s.today.failed)} today · ${num(s.queues.failed)} in the failed store`)}
        ${stat('Pending', num(s.queues.pending), `${num(s.queues.delayed)} delayed · ${num(s.queues.reserved)} running`)}
        ${stat('Max wait', wait, s.queues.max_wait ? `on ${esc(s.queues.max_wait.queue)}` : 'no backlog')}
        ${stat('Workers', num(s.workers.processes), `${num(s.workers.busy)} of ${num(s.workers.executors)} executors busy`)}
      </div><h2>Workload</h2>`;
      const per = {};
      for (const w of workers.data) for (const sup of w.supervisors) for (const p of sup.pools || []) for (const q of p.queues) per[q] = (per[q] || 0) + p.workers;
      html += table([
        { title: 'Queue', cell: (q) => `<a href="#/jobs?queue=${encodeURIComponent(q.queue)}">${esc(q.queue)}</a> ${q.paused ? pill('paused') : ''}` },
        { title: 'Pending', num: 1, cell: (q) => num(q.pending) },
        { title: 'Delayed', num: 1, cell: (q) => num(q.delayed) },
        { title: 'Running', num: 1, cell: (q) => num(q.reserved) },
        { title: 'Failed', num: 1, cell: (q) => num(q.failed) },
        { title: 'Workers', num: 1, cell: (q) => num(per[q.queue] || 0) },
        { title: 'Per min', num: 1, cell: (q) => num(q.per_minute) },
        { title: 'Wait', num: 1, cell: (q) => `${q.oldest_wait_s.toFixed(1)} s` },
      ], queues.data, 'No queues yet: enqueue a job (try `conveyor bench`).');
      html += '<h2>Workers and supervisors</h2>';
      const sups = workers.data.flatMap((w) => w.supervisors.map((sup) => ({ w, sup })));
      html += table([
        { title: 'Process', cell: ({ w }) => `<span class="mono">${esc(w.hostname)}:${w.pid}</span> ${pill(w.status)}` },
        { title: 'Supervisor', cell: ({ sup }) => `${esc(sup.name)} <span class="muted">(${esc(sup.balance)})</span>` },
        { title: 'Queues', cell: ({ sup }) => (sup.pools || []).map((p) => `${esc(p.queues.join(', '))}: ${p.workers}`).join('<br>') },
        { title: 'Busy', num: 1, cell: ({ sup }) => `${sup.busy} / ${sup.concurrency}` },
        { title: 'Processed', num: 1, cell: ({ sup }) => num(sup.processed) },
        { title: 'Up since', cell: ({ w }) => ago(w.started_at) },
        // Remote (Faktory) workers can be told to go quiet or to stop on their next BEAT.
        { title: '', cell: ({ w, sup }) => (sup.name.startsWith('faktory') && !['quiet', 'terminate'].includes(w.status)
          ? `<div class="actions"><button data-action="quiet" onclick="act('/api/workers/${encodeURIComponent(w.id)}/quiet', null, 'Worker told to go quiet')">Quiet</button>
             <button class="danger" data-action="stop" onclick="act('/api/workers/${encodeURIComponent(w.id)}/stop', 'Stop this worker process?', 'Worker told to stop')">Stop</button></div>` : '') },
      ], sups, 'No worker has reported in the last 30 s.');
      // Kinds run elsewhere: HTTP kinds (called by Conveyor) and remote kinds (fetched over Faktory).
      const outside = kinds.data.filter((k) => k.type === 'http' || k.type === 'remote');
      if (outside.length) {
        html += '<h2>HTTP and remote kinds</h2>' + table([
          { title: 'Kind', cell: (k) => `<span class="mono">${esc(k.name)}</span> ${pill(k.type)}` },
          { title: 'Queue', cell: (k) => esc(k.queue) },
          { title: 'Runs at', cell: (k) => (k.http ? `<span class="mono">${esc(k.http.url)}</span>` : 'remote workers (Faktory)') },
          { title: 'Concurrency', num: 1, cell: (k) => (k.http ? num(k.http.concurrency) : '') },
          { title: 'Rate limit', cell: (k) => esc(k.http?.rate_limit || '') },
          { title: 'Listens to', cell: (k) => esc((k.http?.listen || []).join(', ')) },
          { title: 'Breaker', cell: (k) => (k.http ? pill(k.http.breaker_state) : '') },
        ], outside);
      }
      if (breakers.data.length) {
        html += '<h2>Circuit breakers</h2>' + table([
          { title: 'Breaker', cell: (b) => esc(b.name) },
          { title: 'State', cell: (b) => pill(b.state) },
          { title: 'Failure rate', num: 1, cell: (b) => `${(b.failure_rate * 100).toFixed(1)} %` },
          { title: 'Calls', num: 1, cell: (b) => num(b.calls) },
          { title: 'Opened', cell: (b) => ago(b.opened_at) },
        ], breakers.data);
      }
      if (keys.data.length) {
        html += '<h2>Concurrency keys</h2>' + table([
          { title: 'Key', cell: (k) => `<span class="mono">${esc(k.key)}</span>` },
          { title: 'Running', num: 1, cell: (k) => num(k.running) },
          { title: 'Limit', num: 1, cell: (k) => num(k.limit) },
          { title: 'Waiting', num: 1, cell: (k) => num(k.waiting) },
        ], keys.data);
      }
      return html;
    },
  };
}

function metrics(parts, params) {
  const period = params.get('period') || 'hour';
  return {
    frame: `<h1>Metrics</h1><div class="filters">Period:
      <select onchange="go({period:this.value})"><option value="hour" ${period === 'hour' ? 'selected' : ''}>last hour</option>
      <option value="day" ${period === 'day' ? 'selected' : ''}>last day</option></select></div>`,
    async data() {
      const [q, k] = await Promise.all([api(`/api/metrics/queues?period=${period}`), api(`/api/metrics/jobs?period=${period}`)]);
      const block = (s) => `<div class="card"><h2>${esc(s.name)}</h2>
        <div class="muted">${num(s.totals.processed)} jobs · ${num(s.totals.failed)} failed · avg ${ms(s.totals.avg_runtime_ms)} · p95 ${ms(s.totals.p95_runtime_ms)} · wait p95 ${ms(s.totals.p95_wait_ms)}</div>
        <div class="muted">Jobs processed${period === 'day' ? ' per 30 min' : ' per minute'}</div>${chart(s.points, 'processed', { period })}
        <div class="muted">Runtime p95</div>${chart(s.points, 'p95_runtime_ms', { bad: true, period, sum: false, fmt: (v) => ms(v) })}</div>`;
      return `<h2>By queue</h2>${q.data.length ? `<div class="split">${q.data.map(block).join('')}</div>` : '<p class="muted">No jobs ran in this period.</p>'}
        <h2>By job kind</h2>${k.data.length ? `<div class="split">${k.data.map(block).join('')}</div>` : '<p class="muted">No jobs ran in this period.</p>'}`;
    },
  };
}

function jobRow() {
  return [
    { title: 'Job', cell: (j) => `<a class="mono" href="#/jobs/${j.id}">${esc(j.id.slice(0, 8))}…</a>` },
    { title: 'Kind', cell: (j) => esc(j.kind) },
    { title: 'Queue', cell: (j) => esc(j.queue) },
    { title: 'Status', cell: (j) => pill(j.state) },
    { title: 'Attempts', num: 1, cell: (j) => `${j.attempts}/${j.max_attempts}` },
    { title: 'Tags', cell: (j) => j.tags.map(esc).join(', ') },
    { title: 'Created', cell: (j) => ago(j.created_at) },
    { title: 'Runtime', num: 1, cell: (j) => ms(j.runtime_ms) },
  ];
}

function jobs(parts, params) {
  if (parts[1]) return jobDetail(parts[1]);
  const f = (k) => esc(params.get(k) || '');
  const statuses = ['', 'pending', 'delayed', 'reserved', 'completed', 'failed'];
  return {
    frame: `<h1>Jobs</h1><form class="filters" onsubmit="event.preventDefault(); go({queue:this.queue.value, kind:this.kind.value, tag:this.tag.value, status:this.status.value, page:''})">
      <input name="queue" placeholder="queue" value="${f('queue')}"><input name="kind" placeholder="kind" value="${f('kind')}">
      <input name="tag" placeholder="tag" value="${f('tag')}">
      <select name="status">${statuses.map((s) => `<option value="${s}" ${params.get('status') === s ? 'selected' : ''}>${s || 'any status'}</option>`).join('')}</select>
      <button class="primary">Filter</button></form>`,
    async data() {
      const q = new URLSearchParams();
      for (const k of ['queue', 'kind', 'tag', 'status', 'page']) if (params.get(k)) q.set(k, params.get(k));
      q.set('per_page', '50');
      const res = await api(`/api/jobs?${q}`);
      return table(jobRow(), res.data, 'No jobs match.') + pager(res.meta);
    },
  };
}

function jobDetail(id) {
  return {
    frame: `<h1>Job <span class="mono">${esc(id)}</span></h1>`,
    async data() {
      const j = (await api(`/api/jobs/${id}`)).data;
      const wf = j.tags.find((t) => t.startsWith('workflow:'));
      const batch = j.batch_id ? `<a href="#/batches/${esc(j.batch_id)}">${esc(j.batch_id)}</a>` : '—';
      const actions = j.state === 'failed'
        ? `<div class="actions"><button class="primary" onclick="act('/api/jobs/failed/${j.id}/retry', null, 'Job queued again')">Retry</button>
           <button class="danger" onclick="if(confirm('Forget this failed job?')) api('/api/jobs/failed/${j.id}', {method:'DELETE'}).then(() => { toast('Forgotten'); go({}); location.hash='#/failed'; })">Forget</button></div>`
        : '';
      return `<div class="split"><div class="card"><dl class="kv">
        <dt>Status</dt><dd>${pill(j.state)}</dd><dt>Kind</dt><dd>${esc(j.kind)}</dd><dt>Queue</dt><dd>${esc(j.queue)}</dd>
        <dt>Attempts</dt><dd>${j.attempts} of ${j.max_attempts}</dd><dt>Priority</dt><dd>${j.priority}</dd>
        <dt>Tags</dt><dd>${j.tags.map(esc).join(', ') || '—'}</dd><dt>Batch</dt><dd>${batch}</dd>
        ${wf ? `<dt>Workflow</dt><dd><a href="#/workflows/${esc(wf.slice(9))}">${esc(wf.slice(9))}</a></dd>` : ''}
        <dt>Created</dt><dd>${ago(j.created_at)}</dd><dt>Available</dt><dd>${ago(j.available_at)}</dd>
        <dt>Reserved</dt><dd>${ago(j.reserved_at)}</dd><dt>Finished</dt><dd>${ago(j.finished_at)}</dd>
        <dt>Wait</dt><dd>${ms(j.wait_ms)}</dd><dt>Runtime</dt><dd>${ms(j.runtime_ms)}</dd><dt>Worker</dt><dd class="mono">${esc(j.worker || '—')}</dd>
        </dl>${actions}</div>
        <div class="card">${j.waiting ? `<p class="muted" data-waiting="${esc(j.waiting.reason)}">Waiting: ${esc(j.waiting.detail)}</p>` : ''}
        ${j.remote ? '<p class="muted">Run by a worker in another language (Faktory).</p>' : ''}
        <h2>Payload</h2><pre>${esc(JSON.stringify(j.payload, null, 2))}</pre>
        ${j.error ? `<h2>Error</h2><pre>${esc(j.error)}</pre>` : ''}</div></div>`;
    },
  };
}

function failed(parts, params) {
  return {
    frame: `<h1>Failed jobs</h1><div class="actions" style="margin-bottom:12px">
      <button class="primary" onclick="act('/api/jobs/failed/retry-all', 'Retry every failed job?', 'All failed jobs queued again')">Retry all</button></div>`,
    async data() {
      const res = await api(`/api/jobs/failed?per_page=50&page=${params.get('page') || 1}`);
      return table([
        { title: 'Job', cell: (j) => `<a class="mono" href="#/jobs/${j.id}">${esc(j.id.slice(0, 8))}…</a>` },
        { title: 'Kind', cell: (j) => esc(j.kind) },
        { title: 'Queue', cell: (j) => esc(j.queue) },
        { title: 'Attempts', num: 1, cell: (j) => `${j.attempts}/${j.max_attempts}` },
        { title: 'Error', cell: (j) => `<span title="${esc(j.error)}">${esc(j.error.split('\n')[0].slice(0, 90))}</span>` },
        { title: 'Failed', cell: (j) => ago(j.failed_at) },
        { title: '', cell: (j) => `<div class="actions"><button onclick="act('/api/jobs/failed/${j.id}/retry', null, 'Job queued again')">Retry</button>
            <button class="danger" onclick="if(confirm('Forget this failed job?')) api('/api/jobs/failed/${j.id}', {method:'DELETE'}).then(() => { toast('Forgotten'); refresh(); })">Forget</button></div>` },
      ], res.data, 'No failed jobs.') + pager(res.meta);
    },
  };
}

function progress(b) {
  return `<div class="progress ${b.failed ? 'bad' : ''}" title="${b.progress}%"><div style="width:${b.progress}%"></div></div>`;
}

function batches(parts, params) {
  if (parts[1]) return batchDetail(parts[1]);
  return {
    frame: '<h1>Batches</h1>',
    async data() {
      const res = await api(`/api/batches?per_page=50&page=${params.get('page') || 1}`);
      return table([
        { title: 'Batch', cell: (b) => `<a href="#/batches/${b.id}">${esc(b.name)}</a>` },
        { title: 'Status', cell: (b) => pill(b.status) },
        { title: 'Progress', cell: (b) => `${progress(b)} <span class="muted">${b.progress}%</span>` },
        { title: 'Total', num: 1, cell: (b) => num(b.total) },
        { title: 'Pending', num: 1, cell: (b) => num(b.pending) },
        { title: 'Failed', num: 1, cell: (b) => num(b.failed) },
        { title: 'Created', cell: (b) => ago(b.created_at) },
        { title: '', cell: (b) => (b.finished_at || b.cancelled_at ? '' : `<button class="danger" onclick="act('/api/batches/${b.id}/cancel', 'Cancel this batch? Jobs not yet run are skipped.', 'Batch cancelled')">Cancel</button>`) },
      ], res.data, 'No batches yet.') + pager(res.meta);
    },
  };
}

function batchDetail(id) {
  return {
    frame: '<h1>Batch</h1>',
    async data() {
      const b = (await api(`/api/batches/${id}`)).data;
      return `<div class="card"><dl class="kv"><dt>Name</dt><dd>${esc(b.name)}</dd><dt>Status</dt><dd>${pill(b.status)}</dd>
        <dt>Progress</dt><dd>${progress(b)} ${b.progress}%</dd>
        <dt>Jobs</dt><dd>${num(b.total)} total · ${num(b.processed)} processed · ${num(b.failed)} failed · ${num(b.pending)} pending</dd>
        <dt>Allow failures</dt><dd>${b.allow_failures ? 'yes' : 'no'}</dd><dt>Created</dt><dd>${ago(b.created_at)}</dd>
        <dt>Finished</dt><dd>${ago(b.finished_at)}</dd><dt>Cancelled</dt><dd>${ago(b.cancelled_at)}</dd></dl>
        ${b.finished_at || b.cancelled_at ? '' : `<div class="actions" style="margin-top:10px"><button class="danger" onclick="act('/api/batches/${b.id}/cancel', 'Cancel this batch?', 'Batch cancelled')">Cancel batch</button></div>`}</div>
        <h2>Failed jobs</h2>${table(jobRow(), b.failed_jobs, 'No failed jobs in this batch.')}`;
    },
  };
}

function workflow(parts) {
  const id = parts[1] || '';
  return {
    frame: '<h1>Workflow</h1>',
    async data() {
      const w = (await api(`/api/workflows/${encodeURIComponent(id)}`)).data;
      const steps = w.steps.map((s) => `<div class="step"><div class="dot ${esc(s.status)}"></div>
        <div><strong>${esc(s.name)}</strong> <span class="muted">${esc(s.role)}</span> ${pill(s.status)}
        ${s.error ? `<div class="muted">${esc(s.error)}</div>` : ''}</div>
        <div class="muted">${s.attempts} attempt${s.attempts === 1 ? '' : 's'} · ${s.started_at ? ago(s.started_at) : 'not started'}
        ${s.started_at && s.finished_at ? ` · ${ms(s.finished_at - s.started_at)}` : ''}
        ${s.job_id ? ` · <a href="#/jobs/${s.job_id}">job</a>` : ''}</div></div>`).join('');
      return `<div class="card"><dl class="kv"><dt>Name</dt><dd>${esc(w.name)}</dd><dt>Status</dt><dd>${pill(w.status)}</dd>
        <dt>Started</dt><dd>${ago(w.created_at)}</dd><dt>Finished</dt><dd>${ago(w.finished_at)}</dd>
        ${w.error ? `<dt>Error</dt><dd>${esc(w.error)}</dd>` : ''}</dl></div><h2>Timeline</h2><div class="card timeline">${steps}</div>`;
    },
  };
}

function queues() {
  return {
    frame: '<h1>Queues</h1>',
    async data() {
      const res = await api('/api/queues');
      return table([
        { title: 'Queue', cell: (q) => `<a href="#/jobs?queue=${encodeURIComponent(q.queue)}">${esc(q.queue)}</a>` },
        { title: 'State', cell: (q) => (q.paused ? pill('paused') : pill('running')) },
        { title: 'Pending', num: 1, cell: (q) => num(q.pending) },
        { title: 'Delayed', num: 1, cell: (q) => num(q.delayed) },
        { title: 'Running', num: 1, cell: (q) => num(q.reserved) },
        { title: 'Failed', num: 1, cell: (q) => num(q.failed) },
        { title: 'Wait', num: 1, cell: (q) => `${q.oldest_wait_s.toFixed(1)} s` },
        { title: '', cell: (q) => `<div class="actions">${q.paused
            ? `<button data-action="resume" onclick="act('/api/queues/${encodeURIComponent(q.queue)}/resume', null, 'Queue resumed')">Resume</button>`
            : `<button data-action="pause" onclick="act('/api/queues/${encodeURIComponent(q.queue)}/pause', null, 'Queue paused')">Pause</button>`}
            <button class="danger" onclick="act('/api/queues/${encodeURIComponent(q.queue)}/clear', 'Delete every pending and delayed job of ${esc(q.queue)}?', 'Queue cleared')">Clear</button></div>` },
      ], res.data, 'No queues yet.');
    },
  };
}

function events(parts, params) {
  return {
    frame: `<h1>Events</h1><form class="filters" onsubmit="event.preventDefault(); go({name:this.name.value, page:''})">
      <input name="name" placeholder="event name" value="${esc(params.get('name') || '')}"><button class="primary">Filter</button></form>`,
    async data() {
      const q = new URLSearchParams({ per_page: '50', page: params.get('page') || '1' });
      if (params.get('name')) q.set('name', params.get('name'));
      const res = await api(`/api/events/log?${q}`);
      return table([
        { title: 'Event', cell: (e) => esc(e.name) },
        { title: 'Payload', cell: (e) => `<code>${esc(JSON.stringify(e.payload).slice(0, 120))}</code>` },
        { title: 'Listeners', cell: (e) => e.listeners.map((l) => (l.job_id ? `<a href="#/jobs/${l.job_id}">${esc(l.listener)}</a>` : esc(l.listener))).join(', ') || '—' },
        { title: 'At', cell: (e) => ago(e.created_at) },
      ], res.data, 'No events yet.') + pager(res.meta);
    },
  };
}

// The notification delivery log, filterable by status, channel, event and user.
function notifications(parts, params) {
  const sel = (name, options) => `<select name="${name}"><option value="">any ${name}</option>${options
    .map((o) => `<option ${params.get(name) === o ? 'selected' : ''}>${o}</option>`).join('')}</select>`;
  return {
    frame: `<h1>Notifications</h1><form class="filters" onsubmit="event.preventDefault(); go({status:this.status.value, channel:this.channel.value, event:this.event.value, user_id:this.user_id.value, page:''})">
      ${sel('status', ['pending', 'sent', 'failed', 'rate_limited', 'skipped'])}
      ${sel('channel', ['email', 'sms', 'slack', 'webhook', 'database'])}
      <input name="event" placeholder="event" value="${esc(params.get('event') || '')}">
      <input name="user_id" placeholder="user id" value="${esc(params.get('user_id') || '')}">
      <button class="primary">Filter</button></form>`,
    async data() {
      const q = new URLSearchParams({ per_page: '50', page: params.get('page') || '1' });
      for (const k of ['status', 'channel', 'event', 'user_id']) if (params.get(k)) q.set(k, params.get(k));
      const res = await api(`/api/v1/notifications?${q}`);
      return table([
        { title: 'Event', cell: (n) => esc(n.event) },
        { title: 'Channel', cell: (n) => esc(n.channel) },
        { title: 'Recipient', cell: (n) => esc(n.recipient) },
        { title: 'Status', cell: (n) => pill(n.status) },
        { title: 'Attempts', num: true, cell: (n) => num(n.attempts) },
        { title: 'Error', cell: (n) => (n.error ? `<span class="muted">${esc(n.error.slice(0, 120))}</span>` : '—') },
        { title: 'Provider id', cell: (n) => esc(n.provider_id || '—') },
        { title: 'Created', cell: (n) => ago(n.created_at) },
        { title: 'Sent', cell: (n) => (n.sent_at ? ago(n.sent_at) : '—') },
      ], res.data, 'No notifications yet.') + pager(res.meta);
    },
  };
}

const money = (v) => (v ?? 0).toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });

function orders(parts, params) {
  if (parts[1]) return orderDetail(decodeURIComponent(parts[1]));
  const status = params.get('status') || '';
  return {
    frame: `<h1>Orders</h1>`,
    async data() {
      const q = new URLSearchParams({ per_page: '25', page: params.get('page') || '1' });
      if (status) q.set('status', status);
      const [rt, daily, customers, products, list] = await Promise.all([
        api('/api/kpis/realtime'), api('/api/kpis/daily'), api('/api/leaderboard/customers?limit=5'),
        api('/api/leaderboard/products?limit=5'), api(`/api/orders?${q}`)]);
      const k = rt.data, d = daily.data;
      return `<div class="grid">
          ${stat('Pending', num(k.pending_orders), `${num(k.processing_orders)} processing`)}
          ${stat('Completed today', num(k.completed_today), `${num(k.failed_today)} failed today`)}
          ${stat('Revenue today', money(k.revenue_today))}
          ${stat(`Orders ${esc(d.date)}`, num(d.order_count), `avg ${money(d.average_order_value)} · ${num(d.unique_customers)} customers`)}
        </div>
        <div class="split"><div><h2>Top customers</h2>${table([
          { title: '#', num: 1, cell: (c) => c.rank }, { title: 'Customer', cell: (c) => esc(c.customer_name) },
          { title: 'Orders', num: 1, cell: (c) => num(c.order_count) }, { title: 'Spent', num: 1, cell: (c) => money(c.total_spent) }],
          customers.data, 'No completed orders yet.')}</div>
        <div><h2>Top products</h2>${table([
          { title: '#', num: 1, cell: (p) => p.rank }, { title: 'Product', cell: (p) => `${esc(p.name)} <span class="muted">${esc(p.sku)}</span>` },
          { title: 'Units', num: 1, cell: (p) => num(p.units_sold) }, { title: 'Revenue', num: 1, cell: (p) => money(p.revenue) }],
          products.data, 'No completed orders yet.')}</div></div>
        <h2>Recent orders</h2><div class="filters">${['', 'pending', 'processing', 'completed', 'failed'].map((s) =>
          `<button ${s === status ? 'class="primary"' : ''} onclick="go({status:'${s}', page:''})">${s || 'all'}</button>`).join('')}</div>
        ${table([
          { title: 'Order', cell: (o) => `<a href="#/orders/${encodeURIComponent(o.order_id)}">${esc(o.order_id)}</a>` },
          { title: 'Customer', cell: (o) => esc(o.customer_name) }, { title: 'Status', cell: (o) => pill(o.status) },
          { title: 'Items', num: 1, cell: (o) => o.items.length }, { title: 'Total', num: 1, cell: (o) => money(o.total) },
          { title: 'Date', cell: (o) => esc(o.order_date.slice(0, 10)) }], list.data, 'No orders yet: try `conveyor demo`.')}${pager(list.meta)}`;
    },
  };
}

function orderDetail(id) {
  return {
    frame: `<h1>Order <span class="mono">${esc(id)}</span></h1>`,
    async data() {
      const o = (await api(`/api/orders/${encodeURIComponent(id)}`)).data;
      const steps = (o.steps || []).map((s) => `<div class="step"><div class="dot ${esc(s.status)}"></div>
        <div><strong>${esc(s.name)}</strong> ${pill(s.status)}${s.error ? `<div class="muted">${esc(s.error)}</div>` : ''}</div>
        <div class="muted">${s.attempts} attempt${s.attempts === 1 ? '' : 's'}${s.started_at ? ' · ' + ago(Date.parse(s.started_at)) : ''}
        ${s.started_at && s.finished_at ? ' · ' + ms(Date.parse(s.finished_at) - Date.parse(s.started_at)) : ''}</div></div>`).join('');
      return `<div class="split"><div class="card"><dl class="kv"><dt>Status</dt><dd>${pill(o.status)}</dd>
          <dt>Customer</dt><dd>${esc(o.customer_name)} &lt;${esc(o.customer_email)}&gt; (#${o.customer_id})</dd>
          <dt>Total</dt><dd>${money(o.total)}</dd><dt>Date</dt><dd>${esc(o.order_date)}</dd></dl>
          <h2>Items</h2>${table([{ title: 'SKU', cell: (i) => esc(i.sku) }, { title: 'Qty', num: 1, cell: (i) => i.quantity },
            { title: 'Unit price', num: 1, cell: (i) => money(i.unit_price) }], o.items)}
          <h2>Payments</h2>${table([{ title: 'Status', cell: (p) => pill(p.status) }, { title: 'Amount', num: 1, cell: (p) => money(p.amount) },
            { title: 'Reference', cell: (p) => `<span class="mono">${esc(p.reference || '')}</span>` }], o.payments, 'No payment yet.')}</div>
        <div class="card"><h2>Workflow</h2><div class="timeline">${steps || '<p class="muted">Not started.</p>'}</div></div></div>`;
    },
  };
}

window.addEventListener('hashchange', render);
window.api = api;
window.toast = toast;
window.refresh = refresh;
render();
status();
setInterval(() => { refresh(); status(); }, REFRESH_MS);
