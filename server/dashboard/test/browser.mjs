// Drives the dashboard in headless chromium for cli/tests/dashboard.rs, which owns the server,
// the worker and the training client. One JSON object per line each way: this script prints
// {"step": ...} when it has something for the test (the worker token it created, how fast the
// worker showed up, ...) and reads the test's {"step": ...} lines (worker up, training started,
// trained). Any failure exits non-zero with the reason on stderr; screenshots of every screen go
// to $SCREENSHOT_DIR.

import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const base = process.env.DASHBOARD_URL;
const shots = process.env.SCREENSHOT_DIR;
const exe = process.env.CHROMIUM || '/usr/bin/chromium';
fs.mkdirSync(shots, { recursive: true });

const input = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function expectStep(step) {
  const { value, done } = await input.next();
  if (done) throw new Error(`the test went away before '${step}'`);
  const msg = JSON.parse(value);
  if (msg.step !== step) throw new Error(`expected '${step}' from the test, got ${value}`);
  return msg;
}
function say(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const problems = [];
function watch(page, name) {
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') problems.push(`${name}: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`${name}: ${e}`));
  // Anything the page fetches must come from the server itself.
  page.on('request', (r) => {
    const u = new URL(r.url());
    if (u.origin !== new URL(base).origin && u.protocol !== 'data:') problems.push(`${name}: fetched ${r.url()}`);
  });
}
async function shot(page, name, fullPage = true) {
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage });
}

const browser = await chromium.launch({
  executablePath: exe,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  ctx.setDefaultTimeout(10_000);
  const page = await ctx.newPage();
  watch(page, 'main');

  // --- sign in
  const resp = await page.goto(`${base}/`);
  const csp = resp.headers()['content-security-policy'] ?? '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `a strict CSP, got "${csp}"`);
  await page.getByRole('heading', { name: 'Sign in' }).waitFor();
  await shot(page, '01-signin');
  await page.click('#signin-anonymous');
  await page.getByRole('heading', { name: 'Your rooms' }).waitFor();
  await page.getByText('No rooms yet').waitFor();
  await shot(page, '02-rooms-empty');

  // --- create a room: the live view opens
  await page.fill('#room-name', 'lab');
  await page.click('#create-room button[type=submit]');
  await page.locator('#room-title', { hasText: 'lab' }).waitFor();
  await page.locator('#live-state[data-state=live]').waitFor();
  await page.locator('#no-workers').waitFor();
  await shot(page, '03-room-empty');

  // --- an invite and a worker token, each shown once
  await page.click('#create-invite');
  const invite = (await page.textContent('#secret-value')).trim();
  check(invite.length >= 8, 'an invite code is shown');
  await shot(page, '04-invite-shown-once');
  await page.click('#secret-done');
  check(await page.locator('#secret').count() === 0, 'the invite is gone from the page once dismissed');
  await page.fill('#token-name', 'gpu-box');
  await page.click('#create-token button[type=submit]');
  const token = (await page.textContent('#secret-value')).trim();
  check(token.startsWith('slp_'), 'a worker token is shown');
  await shot(page, '05-worker-token-shown-once');
  await page.click('#secret-done');
  const html = await page.content();
  check(!html.includes(token) && !html.includes(invite), 'no secret left in the page');
  const stored = await page.evaluate(() => JSON.stringify({ ...sessionStorage }));
  check(!stored.includes(token), 'the worker token is not kept in storage');
  const jwt = await page.evaluate(() => JSON.parse(sessionStorage.getItem('sleap-rtc.credential')).secret);
  const room = (await page.textContent('#room-id')).trim();
  say({ step: 'token', token, room, jwt });

  // --- a real worker joins: its card shows within 2 s of the server listing it
  const up = await expectStep('worker_up');
  const t0 = Date.now();
  const card = page.locator(`article.worker[data-peer-id="${up.peer_id}"]`);
  await card.waitFor({ timeout: 2000 });
  say({ step: 'worker_seen', ms: Date.now() - t0 });
  const text = await card.innerText();
  for (const want of ['gpu-box', 'CPU', '0.3.5', 'available']) check(text.includes(want), `worker card shows ${want}: ${text}`);
  await page.locator('#registry-status', { hasText: 'no models yet' }).waitFor();
  await shot(page, '06-worker-joined');

  // --- a training job: busy, its progress, a loss chart growing
  await expectStep('training');
  await page.locator(`article.worker[data-peer-id="${up.peer_id}"][data-status=busy]`).waitFor({ timeout: 30_000 });
  await page.waitForFunction((id) => {
    const line = document.querySelector(`article.worker[data-peer-id="${id}"] polyline.loss`);
    return line && line.getAttribute('points').trim().split(/\s+/).length >= 3;
  }, up.peer_id, { timeout: 30_000 });
  const points = await card.locator('polyline.loss').evaluate((l) => l.getAttribute('points').trim().split(/\s+/).length);
  const progress = await card.locator('[data-field=progress]').innerText();
  check(/epoch \d+/.test(progress) && /loss \d/.test(progress), `progress line: ${progress}`);
  check((await card.innerText()).includes('job_'), 'the current job id shows');
  await shot(page, '07-job-loss-chart');
  say({ step: 'job_seen', points });

  // --- the job ends, the worker is available again, the model it published shows
  await expectStep('trained');
  await page.locator(`article.worker[data-peer-id="${up.peer_id}"][data-status=available]`).waitFor({ timeout: 15_000 });
  const row = page.locator('#models tr[data-model-id]').first();
  await row.waitFor({ timeout: 15_000 });
  const rowText = await row.innerText();
  check(rowText.includes('single_instance') && rowText.includes('gpu-box') && /KiB|MiB/.test(rowText), `model row: ${rowText}`);
  await shot(page, '08-registry');

  // --- a phone-sized screen: one column, nothing cut off sideways
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  check(overflow <= 1, `no horizontal scrolling on a narrow screen (${overflow}px)`);
  await shot(page, '09-room-narrow');

  // --- sign in with the JWT the CLI would hold, in a fresh browser context
  const ctx2 = await browser.newContext({ viewport: { width: 1024, height: 700 } });
  const page2 = await ctx2.newPage();
  watch(page2, 'jwt');
  await page2.goto(`${base}/`);
  await page2.fill('#jwt', jwt);
  await page2.click('#signin-jwt button[type=submit]');
  await page2.locator('a.room-link', { hasText: 'lab' }).waitFor();
  await shot(page2, '10-signin-jwt');
  await ctx2.close();

  // --- sign in with an account key; the room's live view works with it too
  const key = await page.evaluate(async () => {
    const c = JSON.parse(sessionStorage.getItem('sleap-rtc.credential'));
    const r = await fetch('/api/auth/account-keys', {
      method: 'POST', headers: { Authorization: `Bearer ${c.secret}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ name: 'dashboard-test' }),
    });
    return (await r.json()).key_id;
  });
  const ctx3 = await browser.newContext({ viewport: { width: 1024, height: 760 } });
  const page3 = await ctx3.newPage();
  watch(page3, 'key');
  await page3.goto(`${base}/`);
  await page3.fill('#account-key', key);
  await page3.click('#signin-key button[type=submit]');
  await page3.locator('a.room-link', { hasText: 'lab' }).click();
  await page3.locator(`article.worker[data-peer-id="${up.peer_id}"]`).waitFor();
  await page3.locator('#models tr[data-model-id]').first().waitFor();
  await shot(page3, '11-account-key-room');
  await ctx3.close();

  say({ step: 'done', problems });
} catch (e) {
  process.stderr.write(`browser test failed: ${e.stack ?? e}\n`);
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    for (const [i, p] of pages.entries()) await p.screenshot({ path: path.join(shots, `failure-${i}.png`), fullPage: true });
  } catch { /* the browser itself may be gone */ }
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
