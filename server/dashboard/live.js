// A live view of one room over WebSocket signaling: the dashboard registers in the room like any
// peer (role `dashboard`, with the same bearer credential), lists the workers once, then follows
// presence pushes (peer_joined, metadata_updated, peer_left). It also asks workers for the
// room's model registry (`registry_list`): the registry's storage credentials stay on the
// workers, and the browser only ever sees the summary they send back.

const RETRY_MAX_MS = 30_000;
// Close codes after which reconnecting cannot help.
const FINAL = new Map([
  [4003, 'your access to this room was revoked'],
  [4004, 'this room was closed'],
  [4009, 'this connection was replaced by a newer one'],
]);

export class RoomLive {
  /**
   * @param {string} roomId
   * @param {{kind: string, secret: string}} cred
   * @param {{onWorkers: Function, onState: Function, onRegistry: Function}} handlers
   */
  constructor(roomId, cred, handlers) {
    this.roomId = roomId;
    this.cred = cred;
    this.on = handlers;
    /** peer_id → {peer_id, metadata, connected_at} */
    this.workers = new Map();
    this.retryMs = 1000;
    this.closed = false;
    this.nextRequest = 1;
    this.connect();
  }

  connect() {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    this.ws = new WebSocket(`${scheme}://${location.host}/ws`);
    this.on.onState('connecting', 'connecting…');
    this.ws.addEventListener('open', () => {
      const register = { type: 'register', room_id: this.roomId, role: 'dashboard', metadata: { tags: ['dashboard'] } };
      if (this.cred.kind === 'account_key') register.api_key = this.cred.secret;
      else register.jwt = this.cred.secret;
      this.send(register);
    });
    this.ws.addEventListener('message', (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (msg && typeof msg === 'object') this.handle(msg);
    });
    this.ws.addEventListener('close', (ev) => {
      if (this.closed) return;
      const final = FINAL.get(ev.code);
      if (final) {
        this.on.onState('closed', final);
        return;
      }
      this.on.onState('offline', `disconnected; retrying in ${Math.round(this.retryMs / 1000)} s`);
      setTimeout(() => { if (!this.closed) this.connect(); }, this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
    });
  }

  send(msg) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  handle(msg) {
    switch (msg.type) {
      case 'registered_auth':
        this.retryMs = 1000;
        this.me = msg.peer_id;
        this.on.onState('live', 'live');
        this.send({ type: 'discover_peers', filters: { role: 'worker' }, request_id: this.nextRequest++ });
        break;
      case 'peer_list':
        this.workers = new Map();
        for (const p of Array.isArray(msg.peers) ? msg.peers : []) {
          if (p?.role === 'worker') this.workers.set(p.peer_id, p);
        }
        this.on.onWorkers(this.workers, null);
        this.askRegistry();
        break;
      case 'peer_joined':
        if (msg.role === 'worker') {
          this.workers.set(msg.peer_id, msg);
          this.on.onWorkers(this.workers, { joined: msg.peer_id });
          this.askRegistry([msg.peer_id]);
        }
        break;
      case 'metadata_updated': {
        const w = this.workers.get(msg.peer_id);
        if (w) {
          const before = w.metadata?.properties?.status;
          w.metadata = msg.metadata ?? {};
          this.on.onWorkers(this.workers, { updated: msg.peer_id });
          // A job just ended: it may have published a model.
          if (before === 'busy' && w.metadata?.properties?.status !== 'busy') this.askRegistry([msg.peer_id]);
        }
        break;
      }
      case 'peer_left':
        if (this.workers.delete(msg.peer_id)) this.on.onWorkers(this.workers, { left: msg.peer_id });
        break;
      case 'peer_message':
        if (msg.payload?.type === 'registry_list_answer' && this.workers.has(msg.from_peer_id)) {
          this.on.onRegistry(msg.from_peer_id, msg.payload);
        }
        break;
      case 'room_closed':
        this.on.onState('closed', 'this room was closed');
        break;
      case 'error':
        if (!this.me) this.on.onState('closed', `cannot join the room: ${msg.message ?? msg.code}`);
        break;
      default:
        break;
    }
  }

  /** Asks the given workers (default: all) for their view of the registry. */
  askRegistry(ids = [...this.workers.keys()]) {
    for (const id of ids) this.send({ type: 'peer_message', to_peer_id: id, payload: { type: 'registry_list' } });
  }

  close() {
    this.closed = true;
    this.ws?.close(1000);
  }
}
