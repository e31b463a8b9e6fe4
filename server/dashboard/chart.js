// A loss chart as inline SVG built node by node: training loss and validation loss against the
// epoch, with the extreme values labelled. No chart library: two polylines and four labels.

const NS = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

/**
 * @param {Array<[number, number|null, number|null]>} points (epoch, loss, val_loss), by epoch
 * @param {string} label what the chart is about, for its accessible name
 */
export function lossChart(points, label) {
  const W = 320, H = 150, L = 46, R = 8, T = 10, B = 24;
  const epochs = points.map((p) => p[0]);
  const values = points.flatMap((p) => [p[1], p[2]]).filter((v) => typeof v === 'number' && Number.isFinite(v));
  const last = points[points.length - 1];
  const summary = last
    ? `${label}: ${points.length} epochs, latest loss ${fmt(last[1])}${last[2] != null ? `, validation ${fmt(last[2])}` : ''}`
    : `${label}: no finished epoch yet`;
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': summary });
  root.append(svg('title', {}, summary));
  if (values.length === 0) {
    root.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'muted' }, 'waiting for the first epoch'));
    return root;
  }
  const x0 = Math.min(...epochs), x1 = Math.max(...epochs, x0 + 1);
  let y0 = Math.min(...values), y1 = Math.max(...values);
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const x = (e) => L + ((e - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  root.append(
    svg('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, class: 'axis' }),
    svg('line', { x1: L, y1: T, x2: L, y2: H - B, class: 'axis' }),
    svg('text', { x: L - 4, y: T + 8, 'text-anchor': 'end', class: 'tick' }, fmt(y1)),
    svg('text', { x: L - 4, y: H - B, 'text-anchor': 'end', class: 'tick' }, fmt(y0)),
    // Epochs are counted from 1 on screen, as in the progress line above the chart.
    svg('text', { x: L, y: H - 6, class: 'tick' }, `epoch ${x0 + 1}`),
    svg('text', { x: W - R, y: H - 6, 'text-anchor': 'end', class: 'tick' }, `epoch ${x1 + 1}`),
    svg('line', { x1: W - R - 118, y1: T + 4, x2: W - R - 104, y2: T + 4, class: 'line loss' }),
    svg('text', { x: W - R - 100, y: T + 7, class: 'tick' }, 'loss'),
    svg('line', { x1: W - R - 70, y1: T + 4, x2: W - R - 56, y2: T + 4, class: 'line val-loss' }),
    svg('text', { x: W - R - 52, y: T + 7, class: 'tick' }, 'val loss'),
  );
  for (const [i, cls] of [[1, 'loss'], [2, 'val-loss']]) {
    const pts = points.filter((p) => typeof p[i] === 'number').map((p) => `${x(p[0]).toFixed(1)},${y(p[i]).toFixed(1)}`);
    if (pts.length > 0) root.append(svg('polyline', { points: pts.join(' '), class: `line ${cls}` }));
    if (pts.length === 1) {
      const [cx, cy] = pts[0].split(',');
      root.append(svg('circle', { cx, cy, r: 2.5, class: `dot ${cls}` }));
    }
  }
  return root;
}

function fmt(v) {
  return typeof v === 'number' && Number.isFinite(v) ? v.toPrecision(3) : '—';
}
