"""Fills one room with upstream-style Python peers (the `websockets` library, as upstream's worker
and client use it) and reports registrations/s and the server's RSS per idle peer.

Usage: large_room_probe.py SIGNAL_LOAD_BINARY [--peers 2000] [--mix worker=95,client=4,dashboard=1]
       [--concurrency 200] [--subscribe ROLES]

The server is `signal-load --internal-serve DIR` (a plain server with the room limit raised), so
its RSS is its own. Peers register as upstream's do: a worker with its capability metadata, a
client with its tags, no `subscribe` (unless --subscribe gives one to every peer), and every peer
keeps reading what the server sends it.
"""

import argparse
import asyncio
import json
import resource
import subprocess
import tempfile
import time
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
    with urllib.request.urlopen(req, data=data, timeout=30) as r:
        return json.loads(r.read())


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def register_msg(i, role, jwt, room, subscribe):
    msg = {"type": "register", "peer_id": f"{role}-{i}", "room_id": room, "role": role, "jwt": jwt}
    if role == "worker":
        msg["metadata"] = {
            "tags": ["sleap-rtc", "training-worker", "inference-worker"],
            "properties": {"gpu_memory_mb": 24576, "gpu_model": "NVIDIA RTX A5000", "sleap_version": "1.5.2",
                           "sleap_nn_version": "0.1.0", "cuda_version": "12.4", "hostname": f"node-{i}",
                           "worker_name": f"gpu-{i}", "status": "available", "max_concurrent_jobs": 1}}
    else:
        msg["metadata"] = {"tags": [f"{role}"]}
    if subscribe is not None:
        msg["subscribe"] = subscribe
    return msg


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--peers", type=int, default=2000)
    ap.add_argument("--mix", default="worker=95,client=4,dashboard=1")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--subscribe", default=None)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cycle = []
    for part in a.mix.split(","):
        role, _, w = part.partition("=")
        cycle += [role] * int(w or 1)
    subscribe = None if a.subscribe is None else [r for r in a.subscribe.split(",") if r]

    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen([a.binary, "--internal-serve", d], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        addr = server.stdout.readline().decode().strip()
        base = f"http://{addr}"
        jwt = http(base, "POST", "/anonymous-signin")["jwt"]
        room = http(base, "POST", "/api/auth/rooms", token=jwt, body={"name": "probe"})["room_id"]
        rss_empty = rss_kib(server.pid)
        presence = 0
        conns = []

        async def reader(ws):
            nonlocal presence
            try:
                async for m in ws:
                    # A prefix test, not a parse: the probe must not be the bottleneck.
                    if m.startswith(('{"type":"peer_joined"', '{"type":"peer_left"', '{"type":"metadata_updated"')):
                        presence += 1
            except websockets.ConnectionClosed:
                pass

        sem = asyncio.Semaphore(a.concurrency)

        async def one(i):
            async with sem:
                ws = await websockets.connect(f"ws://{addr}/ws", max_size=None, open_timeout=300)
                await ws.send(json.dumps(register_msg(i, cycle[i % len(cycle)], jwt, room, subscribe)))
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "registered_auth":
                        break
                    if m["type"] == "error":
                        raise RuntimeError(f"peer {i} refused: {m}")
                conns.append((ws, asyncio.create_task(reader(ws))))

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(a.peers)))
        secs = time.monotonic() - t0
        await asyncio.sleep(2)
        rss_idle = rss_kib(server.pid)
        print(f"peers: {a.peers} in one room ({a.mix}, subscribe {a.subscribe if subscribe is not None else 'by role'})")
        print(f"registered in {secs:.2f} s: {a.peers / secs:.0f} registrations/s")
        print(f"presence frames received: {presence}")
        print(f"server RSS: {rss_empty / 1024:.1f} MiB empty, {rss_idle / 1024:.1f} MiB idle "
              f"({(rss_idle - rss_empty) / a.peers:.2f} KiB per idle peer)")
        for ws, task in conns:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws, _ in conns), return_exceptions=True)
        server.stdin.close()
        server.wait(timeout=30)


asyncio.run(main())
