"""One side of the aiortc file transfer that transfer-bench compares ours with.

The sender is upstream sleap-rtc's client-to-worker upload loop (sleap_rtc FILE_UPLOAD_*):
64 KiB chunks on one ordered, reliable data channel, and while the channel's bufferedAmount is
over 16 MiB, sleep 0.1 s. The receiver writes each chunk to the file and updates a SHA-256 as it
goes, as upstream's worker does; the parent checks the written file's BLAKE3 itself.

SDP travels through the parent: each side prints one JSON line with its description and reads
the other's from stdin (aiortc puts every gathered candidate in the description, so no trickle).
Results are JSON lines on stdout; anything else goes to stderr.

    python aiortc_bench.py sender PATH
    python aiortc_bench.py receiver PATH
"""

import asyncio
import hashlib
import json
import os
import sys
import time

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

CHUNK = 64 * 1024
HIGH_WATER = 16 * 1024 * 1024


def emit(obj):
    print(json.dumps(obj), flush=True)


async def read_json():
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("stdin closed before the peer's description arrived")
    return json.loads(line)


async def sender(path):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    ch = pc.createDataChannel("bulk")
    opened = asyncio.Event()
    done = asyncio.Event()
    ch.on("open", opened.set)

    @ch.on("message")
    def on_message(m):
        if m == "DONE":
            done.set()

    await pc.setLocalDescription(await pc.createOffer())
    emit({"type": pc.localDescription.type, "sdp": pc.localDescription.sdp})
    answer = await read_json()
    t_setup = time.monotonic()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    await opened.wait()
    setup = time.monotonic() - t_setup
    size = os.path.getsize(path)
    t0 = time.monotonic()
    ch.send(f"FILE_META::{size}")
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            while ch.bufferedAmount > HIGH_WATER:
                await asyncio.sleep(0.1)
            ch.send(chunk)
    ch.send("END_OF_FILE")
    await done.wait()
    emit({"side": "sender", "bytes": size, "secs": time.monotonic() - t0, "setup_ms": setup * 1e3})
    await pc.close()


async def receiver(path):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    done = asyncio.Event()
    st = {"f": None, "sha": hashlib.sha256(), "n": 0, "first": None, "last_report": 0.0}

    @pc.on("datachannel")
    def on_datachannel(ch):
        @ch.on("message")
        def on_message(m):
            if isinstance(m, str):
                if m.startswith("FILE_META::"):
                    st["f"] = open(path, "wb")
                elif m == "END_OF_FILE" and st["f"] is not None:
                    st["f"].close()
                    secs = time.monotonic() - (st["first"] or time.monotonic())
                    emit({"side": "receiver", "bytes": st["n"], "secs": secs, "sha256": st["sha"].hexdigest()})
                    ch.send("DONE")
                    done.set()
                return
            now = time.monotonic()
            if st["first"] is None:
                st["first"] = now
            st["f"].write(m)
            st["sha"].update(m)
            st["n"] += len(m)
            if now - st["last_report"] >= 1.0:
                st["last_report"] = now
                emit({"progress": st["n"], "secs": now - st["first"]})

    offer = await read_json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
    await pc.setLocalDescription(await pc.createAnswer())
    emit({"type": pc.localDescription.type, "sdp": pc.localDescription.sdp})
    await done.wait()
    # Give DONE time to reach the sender (a lost packet costs an SCTP retransmission timeout).
    await asyncio.sleep(3)
    await pc.close()


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("sender", "receiver"):
        sys.exit(__doc__)
    role, path = sys.argv[1], sys.argv[2]
    asyncio.run(sender(path) if role == "sender" else receiver(path))


if __name__ == "__main__":
    main()
