// Small DOM helpers. Every text goes in through textContent (never parsed as HTML), so names,
// tags or errors coming from the server or a worker cannot inject markup.

/**
 * Builds an element: h('button', {class: 'primary', onclick: fn}, 'Save').
 * Attributes whose value is null, undefined or false are left out; `true` sets an empty one.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Tells screen-reader users about something that changed outside their focus. */
export function announce(text) {
  const region = document.getElementById('announce');
  if (region) region.textContent = text;
}

export function formatBytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatMiB(mb) {
  return typeof mb === 'number' && mb > 0 ? formatBytes(mb * 1024 * 1024) : '—';
}

/** Unix seconds or an ISO string → local date and time. */
export function formatTime(t) {
  const d = typeof t === 'number' ? new Date(t * 1000) : new Date(String(t));
  return Number.isNaN(d.getTime()) ? '—' : d.toLocaleString();
}

export function formatLoss(x) {
  return typeof x === 'number' && Number.isFinite(x) ? x.toPrecision(4) : '—';
}
