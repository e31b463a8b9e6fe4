// The dashboard: sign in, rooms, and a live view of one room (workers, their jobs, the model
// registry). Views are plain functions that build DOM nodes; the URL hash says which one shows
// (#/rooms, #/rooms/ROOM_ID), so reloads and the back button work.

import { ApiError, call, credential, forget, signIn, signInAnonymously } from './api.js';
import { lossChart } from './chart.js';
import { announce, fill, formatBytes, formatLoss, formatMiB, formatTime, h } from './dom.js';
import { RoomLive } from './live.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
/** The open room's live connection, closed when leaving the view. */
let live = null;

function errorText(e) {
  return e instanceof ApiError ? `${e.message} (${e.code})` : String(e?.message ?? e);
}

/** A 401 means the credential expired or was revoked: back to sign-in. */
function failed(e, errorEl) {
  if (e instanceof ApiError && e.status === 401) {
    forget();
    route('Your credential expired or was revoked; sign in again.');
    return;
  }
  errorEl.textContent = errorText(e);
}

function show(title, ...children) {
  document.title = `${title} · sleap-rtc`;
  fill(main, ...children);
  main.querySelector('h2')?.focus();
}

function route(message) {
  live?.close();
  live = null;
  const cred = credential();
  renderNav(cred);
  if (!cred) return showSignin(typeof message === 'string' ? message : '');
  const m = location.hash.match(/^#\/rooms\/([A-Za-z0-9_-]{1,128})$/);
  return m ? showRoom(m[1]) : showRooms();
}

function renderNav(cred) {
  if (!cred) return fill(nav);
  return fill(nav,
    h('a', { href: '#/rooms' }, 'Rooms'),
    h('span', { class: 'who' }, `Signed in as ${cred.username || cred.user_id}`),
    h('button', { type: 'button', id: 'signout', onclick: () => { forget(); location.hash = ''; route(); } }, 'Sign out'));
}

// ---------------------------------------------------------------------------------------------
// Sign in

function showSignin(message) {
  const err = h('p', { class: 'error', role: 'alert', id: 'signin-error' }, message);
  const attempt = async (fn) => {
    err.textContent = '';
    try {
      await fn();
      location.hash = '#/rooms';
      route();
    } catch (e) {
      err.textContent = errorText(e);
    }
  };
  const key = h('input', { id: 'account-key', type: 'password', autocomplete: 'off', spellcheck: 'false', placeholder: 'slp_acct_…', required: true });
  const jwt = h('textarea', { id: 'jwt', rows: 3, autocomplete: 'off', spellcheck: 'false', required: true });
  show('Sign in',
    h('section', { class: 'card narrow', 'aria-labelledby': 'signin-title' },
      h('h2', { id: 'signin-title', tabindex: -1 }, 'Sign in'),
      h('p', { class: 'muted' }, 'Your credential is kept in this browser tab only and sent to this server as a bearer token.'),
      h('button', { type: 'button', id: 'signin-anonymous', class: 'primary', onclick: () => attempt(signInAnonymously) }, 'Continue anonymously'),
      h('form', { id: 'signin-key', onsubmit: (e) => { e.preventDefault(); attempt(() => signIn('account_key', key.value)); } },
        h('label', { for: 'account-key' }, 'Account key'), key,
        h('button', { type: 'submit' }, 'Sign in with the key')),
      h('form', { id: 'signin-jwt', onsubmit: (e) => { e.preventDefault(); attempt(() => signIn('jwt', jwt.value)); } },
        h('label', { for: 'jwt' }, 'JWT from the CLI'),
        h('p', { class: 'hint', id: 'jwt-hint' }, 'The "jwt" value of ~/.config/sleap-rtc/credentials.json after sleap-rtc login.'),
        jwt,
        h('button', { type: 'submit' }, 'Sign in with the JWT')),
      err));
  jwt.setAttribute('aria-describedby', 'jwt-hint');
}

// ---------------------------------------------------------------------------------------------
// Rooms

async function showRooms() {
  const list = h('div', { id: 'rooms-list', 'aria-busy': 'true' }, 'Loading…');
  const err = h('p', { class: 'error', role: 'alert' });
  const name = h('input', { id: 'room-name', maxlength: 50, autocomplete: 'off' });
  const days = h('input', { id: 'room-days', type: 'number', min: 1, max: 365, value: 30, inputmode: 'numeric' });
  const code = h('input', { id: 'invite-code', autocomplete: 'off', spellcheck: 'false', required: true });
  show('Rooms',
    h('section', { class: 'card', 'aria-labelledby': 'rooms-title' },
      h('h2', { id: 'rooms-title', tabindex: -1 }, 'Your rooms'), list),
    h('div', { class: 'grid2' },
      h('section', { class: 'card', 'aria-labelledby': 'create-title' },
        h('h3', { id: 'create-title' }, 'Create a room'),
        h('form', { id: 'create-room', onsubmit: async (e) => {
          e.preventDefault();
          try {
            // The answer also carries the legacy room token (for upstream clients); the
            // dashboard does not need it, so it is neither shown nor kept.
            const r = await call('POST', '/api/auth/rooms', { name: name.value.trim(), expires_in_days: Number(days.value) });
            location.hash = `#/rooms/${r.room_id}`;
          } catch (ex) { failed(ex, err); }
        } },
        h('label', { for: 'room-name' }, 'Name'), name,
        h('label', { for: 'room-days' }, 'Expires after (days)'), days,
        h('button', { type: 'submit', class: 'primary' }, 'Create room'))),
      h('section', { class: 'card', 'aria-labelledby': 'join-title' },
        h('h3', { id: 'join-title' }, 'Join with an invite'),
        h('form', { id: 'join-room', onsubmit: async (e) => {
          e.preventDefault();
          try {
            const r = await call('POST', '/api/auth/rooms/join', { invite_code: code.value.trim() });
            location.hash = `#/rooms/${r.room_id}`;
          } catch (ex) { failed(ex, err); }
        } },
        h('label', { for: 'invite-code' }, 'Invite code'), code,
        h('button', { type: 'submit' }, 'Join')))),
    err);
  try {
    const { rooms } = await call('GET', '/api/auth/rooms');
    list.removeAttribute('aria-busy');
    if (!rooms.length) return fill(list, h('p', { class: 'muted' }, 'No rooms yet: create one below.'));
    fill(list, h('div', { class: 'scroll', role: 'region', 'aria-label': 'Rooms', tabindex: 0 },
      h('table', {},
        h('thead', {}, h('tr', {}, ['Name', 'Your role', 'Expires', 'Room id'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rooms.map((r) => h('tr', {},
          h('td', {}, h('a', { href: `#/rooms/${encodeURIComponent(r.room_id)}`, class: 'room-link' }, r.name || '(unnamed)')),
          h('td', {}, r.role),
          h('td', {}, r.expired ? 'expired' : formatTime(r.expires_at)),
          h('td', {}, h('code', {}, r.room_id))))))));
  } catch (e) {
    list.removeAttribute('aria-busy');
    fill(list);
    failed(e, err);
  }
}

// ---------------------------------------------------------------------------------------------
// One room

async function showRoom(id) {
  const err = h('p', { class: 'error', role: 'alert' });
  let room;
  try {
    room = await call('GET', `/api/auth/rooms/${encodeURIComponent(id)}`);
  } catch (e) {
    show('Room', h('p', {}, h('a', { href: '#/rooms' }, '← Rooms')), h('h2', { tabindex: -1 }, 'Room'), err);
    return failed(e, err);
  }
  const secretSlot = h('div', { id: 'secret-slot' });
  const state = h('span', { id: 'live-state', class: 'pill', role: 'status' }, 'connecting…');
  const workersEl = h('div', { id: 'workers', class: 'workers' });
  const registryStatus = h('p', { id: 'registry-status', class: 'muted', role: 'status' });
  const registryEl = h('div', { id: 'registry' });
  const tokenName = h('input', { id: 'token-name', maxlength: 64, autocomplete: 'off', required: true, placeholder: 'gpu-box' });
  const tokenDays = h('input', { id: 'token-days', type: 'number', min: 1, max: 365, value: 7, inputmode: 'numeric' });
  const owner = room.role === 'owner';
  const origin = location.origin;

  const createInvite = async () => {
    try {
      const r = await call('POST', `/api/auth/rooms/${encodeURIComponent(id)}/invite`, {});
      showSecret(secretSlot, 'Invite code', r.invite_code,
        `Single use, valid ${Math.round(r.expires_in_seconds / 60)} minutes. Paste it under "Join with an invite".`);
    } catch (e) { failed(e, err); }
  };
  const createToken = async (e) => {
    e.preventDefault();
    try {
      const r = await call('POST', '/api/auth/token', { room_id: id, worker_name: tokenName.value.trim(), expires_in_days: Number(tokenDays.value) });
      showSecret(secretSlot, `Worker token for ${r.worker_name}`, r.token_id,
        `sleap-rtc worker --server ${origin} --token ${r.token_id} --work-dir /scratch/sleap-rtc`);
    } catch (ex) { failed(ex, err); }
  };

  show(room.name || 'Room',
    h('p', {}, h('a', { href: '#/rooms' }, '← Rooms')),
    h('section', { class: 'card', 'aria-labelledby': 'room-title' },
      h('div', { class: 'row spread' },
        h('h2', { id: 'room-title', tabindex: -1 }, room.name || '(unnamed room)'), state),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Room id'), h('dd', {}, h('code', { id: 'room-id' }, room.room_id)),
        h('dt', {}, 'Your role'), h('dd', {}, room.role),
        h('dt', {}, 'Expires'), h('dd', {}, formatTime(room.expires_at))),
      h('div', { class: 'row wrap' },
        owner ? h('button', { type: 'button', id: 'create-invite', onclick: createInvite }, 'Create invite') : null,
        h('form', { id: 'create-token', class: 'inline', onsubmit: createToken },
          h('label', { for: 'token-name' }, 'Worker name'), tokenName,
          h('label', { for: 'token-days' }, 'Days'), tokenDays,
          h('button', { type: 'submit' }, 'Create worker token'))),
      secretSlot, err),
    h('section', { class: 'card', 'aria-labelledby': 'workers-title' },
      h('h3', { id: 'workers-title' }, 'Workers'), workersEl),
    h('section', { class: 'card', 'aria-labelledby': 'registry-title' },
      h('div', { class: 'row spread' },
        h('h3', { id: 'registry-title' }, 'Model registry'),
        h('button', { type: 'button', id: 'registry-refresh', onclick: () => live?.askRegistry() }, 'Refresh')),
      registryStatus, registryEl));

  const answers = new Map();
  const seen = new Map();
  renderWorkers(workersEl, new Map(), seen, null);
  renderRegistry(registryEl, registryStatus, answers, new Map());
  const cred = credential();
  live = new RoomLive(id, cred, {
    onState: (kind, text) => { state.textContent = text; state.dataset.state = kind; },
    onWorkers: (workers, change) => {
      for (const wid of answers.keys()) if (!workers.has(wid)) answers.delete(wid);
      renderWorkers(workersEl, workers, seen, change);
      renderRegistry(registryEl, registryStatus, answers, workers);
    },
    onRegistry: (wid, answer) => {
      answers.set(wid, answer);
      renderRegistry(registryEl, registryStatus, answers, live?.workers ?? new Map());
    },
  });
}

/** Shows a secret once, with a way to copy it; "Done" removes it from the page. */
function showSecret(slot, title, secret, help) {
  const value = h('code', { id: 'secret-value', class: 'secret-value', tabindex: 0 }, secret);
  const copy = h('button', { type: 'button', onclick: async () => {
    try {
      await navigator.clipboard.writeText(secret);
      copy.textContent = 'Copied';
    } catch {
      // No clipboard access (plain HTTP beyond localhost): select it for Ctrl+C.
      getSelection()?.selectAllChildren(value);
      copy.textContent = 'Selected: press Ctrl+C';
    }
  } }, 'Copy');
  fill(slot, h('div', { class: 'secret', id: 'secret', role: 'alert' },
    h('h4', {}, title),
    h('p', {}, 'Shown once: copy it now. The server keeps only a hash of it and cannot show it again.'),
    value,
    h('p', { class: 'hint' }, help),
    h('div', { class: 'row' }, copy, h('button', { type: 'button', id: 'secret-done', onclick: () => fill(slot) }, 'Done'))));
  value.focus();
}

// ---------------------------------------------------------------------------------------------
// Workers and their jobs

function props(w) {
  const p = w?.metadata?.properties;
  return p && typeof p === 'object' ? p : {};
}

function workerName(w) {
  const p = props(w);
  return typeof p.worker_name === 'string' && p.worker_name ? p.worker_name : w.peer_id;
}

function renderWorkers(el, workers, seen, change) {
  if (workers.size === 0) {
    fill(el, h('p', { class: 'muted', id: 'no-workers' },
      'No worker is connected. Create a worker token above and start sleap-rtc worker with it.'));
  } else {
    const sorted = [...workers.values()].sort((a, b) => workerName(a).localeCompare(workerName(b)));
    fill(el, sorted.map((w, i) => workerCard(w, i, seen)));
  }
  if (change?.joined) announce(`${workerName(workers.get(change.joined))} joined the room`);
  if (change?.left) announce(`A worker left the room`);
  if (change?.updated) {
    const w = workers.get(change.updated);
    if (w) announce(`${workerName(w)} is ${props(w).status ?? 'unknown'}`);
  }
}

function workerCard(w, i, seen) {
  const p = props(w);
  const status = typeof p.status === 'string' ? p.status : 'unknown';
  const titleId = `worker-${i}`;
  const fact = (label, value) => [h('dt', {}, label), h('dd', {}, value ?? '—')];
  return h('article', { class: 'worker', 'data-peer-id': w.peer_id, 'data-status': status, 'aria-labelledby': titleId },
    h('header', { class: 'row spread' },
      h('h4', { id: titleId }, workerName(w)),
      h('span', { class: `badge ${status}`, 'data-field': 'status' }, status)),
    h('dl', { class: 'facts' },
      fact('GPU', p.gpu_model),
      fact('GPU memory', formatMiB(p.gpu_memory_mb)),
      fact('sleap-nn', p.sleap_nn_version),
      fact('Free disk', formatMiB(p.free_disk_mb)),
      fact('Current job', p.current_job),
      fact('Peer id', h('code', {}, w.peer_id))),
    status === 'busy' ? jobBlock(p, seen) : null);
}

function jobBlock(p, seen) {
  if (!p.progress_published) {
    return h('p', { class: 'muted job' }, 'This worker does not publish job progress (start it with --publish-progress to see a loss chart here).');
  }
  const prog = p.progress && typeof p.progress === 'object' ? p.progress : null;
  if (!prog) return h('p', { class: 'muted job' }, 'Job starting…');
  const key = `${prog.job_id}/${prog.model ?? ''}`;
  // Points seen live are kept, so the chart is finer than the worker's thinned history.
  const points = seen.get(key) ?? new Map();
  seen.set(key, points);
  for (const pt of Array.isArray(prog.history) ? prog.history : []) {
    if (Array.isArray(pt) && Number.isInteger(pt[0])) points.set(pt[0], pt);
  }
  const sorted = [...points.values()].sort((a, b) => a[0] - b[0]);
  const line = [];
  if (prog.model) line.push(`model ${prog.model}`);
  if (Number.isInteger(prog.epoch)) line.push(`epoch ${prog.epoch + 1}`);
  if (typeof prog.loss === 'number') line.push(`loss ${formatLoss(prog.loss)}`);
  if (typeof prog.val_loss === 'number') line.push(`val loss ${formatLoss(prog.val_loss)}`);
  const inference = Number.isInteger(prog.n_processed);
  return h('div', { class: 'job', 'data-job-id': prog.job_id },
    h('p', { class: 'job-line', 'data-field': 'progress' }, line.join(' · ') || 'running'),
    inference
      ? h('progress', { max: prog.n_total ?? '', value: prog.n_processed, 'aria-label': 'frames processed' })
      : lossChart(sorted, `Loss of ${prog.job_id}`));
}

// ---------------------------------------------------------------------------------------------
// Model registry

function renderRegistry(el, status, answers, workers) {
  const names = new Map([...workers.values()].map((w) => [w.peer_id, workerName(w)]));
  const label = (id) => names.get(id) ?? id;
  const got = [...answers.entries()].filter(([wid]) => workers.has(wid));
  const withRegistry = got.filter(([, a]) => a.registry === true && !a.error);
  if (workers.size === 0) {
    status.textContent = 'The registry is read through the room\'s workers, and none is connected.';
    return fill(el);
  }
  if (got.length === 0) {
    status.textContent = 'Asking the workers…';
    return fill(el);
  }
  if (withRegistry.length === 0) {
    const broken = got.some(([, a]) => a.error);
    status.textContent = broken
      ? 'A worker could not read the registry (see its log).'
      : 'No connected worker has a model registry (start one with --registry).';
    return fill(el);
  }
  const models = new Map();
  let total = 0, truncated = false;
  for (const [wid, a] of withRegistry) {
    total = Math.max(total, Number(a.total) || 0);
    truncated ||= a.truncated === true;
    const cached = new Set(Array.isArray(a.cached) ? a.cached : []);
    for (const m of Array.isArray(a.models) ? a.models : []) {
      if (!m || typeof m.id !== 'string') continue;
      const entry = models.get(m.id) ?? { ...m, holders: new Set() };
      for (const w of Array.isArray(m.available_on_workers) ? m.available_on_workers : []) entry.holders.add(w);
      if (cached.has(m.id)) entry.holders.add(wid);
      models.set(m.id, entry);
    }
  }
  status.textContent = models.size === 0
    ? 'The registry has no models yet: train one on a worker started with --registry.'
    : `${models.size} model${models.size === 1 ? '' : 's'}${truncated ? ` (the newest of ${total})` : ''}`;
  if (models.size === 0) return fill(el);
  const list = (xs) => (Array.isArray(xs) && xs.length ? xs.join(', ') : '—');
  fill(el, h('div', { class: 'scroll', role: 'region', 'aria-label': 'Models', tabindex: 0 },
    h('table', { id: 'models' },
      h('thead', {}, h('tr', {}, ['Model', 'Aliases', 'Tags', 'Size', 'Trained', 'Trained on', 'Cached on']
        .map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, [...models.values()].map((m) => h('tr', { 'data-model-id': m.id },
        h('td', {}, h('code', {}, m.id), h('div', { class: 'muted' }, m.model_type || '')),
        h('td', {}, list(m.aliases)),
        h('td', {}, list(m.tags)),
        h('td', {}, formatBytes(m.size_bytes)),
        h('td', {}, formatTime(m.trained_at),
          h('div', { class: 'muted' }, [m.epochs ? `${m.epochs} epochs` : '', m.final_loss != null ? `loss ${formatLoss(m.final_loss)}` : ''].filter(Boolean).join(' · '))),
        h('td', {}, m.trained_on_worker ? label(m.trained_on_worker) : '—'),
        h('td', {}, list([...m.holders].map(label)))))))));
}

// The skip link's #main is not a view.
window.addEventListener('hashchange', () => { if (location.hash !== '#main') route(); });
route();
