// The server's HTTP API, called with a bearer credential. The credential lives in this tab's
// sessionStorage only (gone when the tab closes) and is sent as an Authorization header, never
// as a cookie, so another site cannot make the browser use it (no CSRF surface).

const KEY = 'sleap-rtc.credential';

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

/** {kind: 'jwt' | 'account_key', secret, user_id, username} or null. */
export function credential() {
  try {
    const c = JSON.parse(sessionStorage.getItem(KEY) ?? 'null');
    return c && typeof c.secret === 'string' ? c : null;
  } catch {
    return null;
  }
}

export function forget() {
  sessionStorage.removeItem(KEY);
}

export async function call(method, path, body, secret = credential()?.secret) {
  const headers = { Accept: 'application/json' };
  if (secret) headers.Authorization = `Bearer ${secret}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit', cache: 'no-store', redirect: 'error',
    });
  } catch (e) {
    throw new ApiError(0, 'NETWORK', `cannot reach the server (${e.message})`);
  }
  let data = null;
  try { data = await resp.json(); } catch { /* an empty or non-JSON body */ }
  if (!resp.ok) {
    throw new ApiError(resp.status, data?.code ?? `HTTP_${resp.status}`, data?.detail ?? resp.statusText);
  }
  return data;
}

/** Checks a credential with /api/auth/me, then keeps it for this tab. */
export async function signIn(kind, secret) {
  const s = secret.trim();
  if (!s) throw new ApiError(0, 'EMPTY', 'paste a credential first');
  if (kind === 'account_key' && !s.startsWith('slp_acct_')) {
    throw new ApiError(0, 'FORMAT', 'an account key starts with slp_acct_');
  }
  const me = await call('GET', '/api/auth/me', undefined, s);
  const c = { kind, secret: s, user_id: me.user_id, username: me.username };
  sessionStorage.setItem(KEY, JSON.stringify(c));
  return c;
}

export async function signInAnonymously() {
  const r = await call('POST', '/anonymous-signin', {}, null);
  return signIn('jwt', r.jwt);
}
