"""Drives a sleap-rtc-server the way the upstream Python peers do, with the `websockets` library.

Usage: upstream_client.py http://127.0.0.1:PORT
Exits 0 and prints "ok" if every step behaved as upstream clients expect; raises otherwise.
"""

import asyncio
import json
import sys
import urllib.request

import websockets


def http(base, method, path, token=None, body=None):
    req = urllib.request.Request(base + path, method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, data=data, timeout=10) as r:
        return json.loads(r.read())


async def recv(ws, want=None):
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if want is None or msg["type"] == want:
            return msg


async def legacy_flow(base, ws_root):
    # upstream worker_class.py: anonymous sign-in, /create-room, register at the bare ws:// URL.
    signin = http(base, "POST", "/anonymous-signin")
    id_token = signin["id_token"]
    room = http(base, "POST", "/create-room", token=id_token)
    async with websockets.connect(ws_root) as worker, websockets.connect(ws_root) as client:
        await worker.send(json.dumps({"type": "register", "peer_id": "worker-py", "room_id": room["room_id"],
                                      "token": room["token"], "id_token": id_token}))
        reg = await recv(worker)
        assert reg["type"] == "registered_auth" and reg["peer_id"] == "worker-py", reg
        await client.send(json.dumps({"type": "register", "peer_id": "client-py", "room_id": room["room_id"],
                                      "token": room["token"], "id_token": id_token}))
        reg = await recv(client)
        assert reg["peer_list"] == ["worker-py"], reg
        # aiortc-style offer/answer, no trickle.
        await client.send(json.dumps({"type": "offer", "sender": "client-py", "target": "worker-py", "sdp": "v=0\r\n"}))
        offer = await recv(worker, "offer")
        assert offer["sender"] == "client-py" and offer["sdp"] == "v=0\r\n", offer
        await worker.send(json.dumps({"type": "answer", "sender": "worker-py", "target": offer["sender"], "sdp": "v=0 a"}))
        answer = await recv(client, "answer")
        assert answer["sdp"] == "v=0 a", answer
        # Upstream's v0 `query` is answered with UNKNOWN_MESSAGE_TYPE, and the socket stays open.
        await client.send(json.dumps({"type": "query"}))
        err = await recv(client, "error")
        assert err["code"] == "UNKNOWN_MESSAGE_TYPE", err
        await client.send("{broken")
        err = await recv(client, "error")
        assert err["code"] == "INVALID_JSON", err


async def dashboard_flow(base, ws_url):
    # sleap-rtc CLI: JWT user creates a room and a worker token; worker registers with api_key.
    owner = http(base, "POST", "/anonymous-signin")["jwt"]
    room = http(base, "POST", "/api/auth/rooms", token=owner, body={"name": "py"})
    tok = http(base, "POST", "/api/auth/token", token=owner, body={"room_id": room["room_id"], "worker_name": "py"})
    async with websockets.connect(ws_url) as worker, websockets.connect(ws_url) as client:
        await worker.send(json.dumps({
            "type": "register", "peer_id": "worker-py-1", "role": "worker", "is_admin": True, "api_key": tok["token_id"],
            "metadata": {"tags": ["sleap-rtc", "training-worker"],
                         "properties": {"gpu_memory_mb": 16384, "status": "available", "max_concurrent_jobs": 1}}}))
        reg = await recv(worker)
        assert reg["room_id"] == room["room_id"] and reg["admin_peer_id"] == "worker-py-1", reg
        await client.send(json.dumps({"type": "register", "peer_id": "client-py-1", "room_id": room["room_id"],
                                      "role": "client", "jwt": owner, "metadata": {"tags": ["training-client"]}}))
        await recv(client, "registered_auth")
        await client.send(json.dumps({"type": "discover_peers", "from_peer_id": "client-py-1", "filters": {
            "role": "worker", "room_id": room["room_id"], "tags": ["sleap-rtc"],
            "properties": {"status": "available", "gpu_memory_mb": {"$gte": 8192}}}}))
        peers = await recv(client, "peer_list")
        assert peers["count"] == 1 and peers["peers"][0]["peer_id"] == "worker-py-1", peers
        await client.send(json.dumps({"type": "peer_message", "from_peer_id": "client-py-1", "to_peer_id": "worker-py-1",
                                      "payload": {"app_message_type": "job_request", "job_id": "j"}}))
        got = await recv(worker, "peer_message")
        assert got["payload"]["job_id"] == "j", got
        await worker.send(json.dumps({"type": "update_metadata", "peer_id": "worker-py-1",
                                      "metadata": {"properties": {"status": "busy"}}}))
        upd = await recv(worker, "metadata_updated")
        assert upd["metadata"]["tags"] == ["sleap-rtc", "training-worker"], upd
        pushed = await recv(client, "metadata_updated")
        assert pushed["metadata"]["properties"]["status"] == "busy", pushed


async def main():
    base = sys.argv[1].rstrip("/")
    ws_root = base.replace("http://", "ws://", 1)
    await legacy_flow(base, ws_root)
    await dashboard_flow(base, ws_root + "/ws")
    print("ok")


asyncio.run(main())
