"""A third-party WebRTC peer (aiortc) that speaks sleap-rtc's file-transfer protocol.

runtime-tokio/tests/aiortc.rs runs it against our Rust peer, so that our SDP, ICE, DTLS, SCTP,
data-channel (DCEP) and transfer framing are checked against a stack we did not write, in both
roles (offerer / answerer) and both directions (sending / receiving files).

Usage:
  aiortc_peer.py --ws ws://127.0.0.1:PORT/ws  (--jwt JWT --room ROOM | --api-key TOKEN)
                 (--offer-to PEER_ID | --answer)  (--send PATH [PATH ...] | --receive DIR)
                 [--timeout SECONDS]

With --jwt/--room it registers as a client, with --api-key as a worker. It prints JSON lines on
stdout: {"event": "registered", "peer_id": ...} as soon as the signaling server accepted it, and
at the end {"event": "result", "ok": ..., "bytes": ..., "seconds": ..., ...}. Diagnostics go to
stderr. The exit status is 0 only if every file arrived and verified.

Only asyncio, aiortc, websockets and blake3 are used.
"""

import argparse
import asyncio
import json
import os
import stat
import struct
import sys
import time
import unicodedata

import aioice.ice
import blake3
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

# --- The transfer protocol (see core/src/transfer.rs) ------------------------------------------

# Bulk frame header: version u8 | kind u8 | reserved u16 | transfer_id u32 | file u32 | offset u64,
# big-endian, followed by the payload.
HEADER = struct.Struct(">BBHIIQ")
FRAME_VERSION = 1
KIND_DATA = 0
# Payload bytes per frame. aiortc advertises a 64 KiB max message size and our Rust peer uses
# 16 KiB frames; 16 KiB fits both with room to spare.
CHUNK = 16 * 1024
# The receiver acknowledges committed bytes at least this often, and at every file end.
ACK_EVERY = 1024 * 1024
# Sender flow control: stop queueing frames once aiortc holds more than HIGH_WATER bytes not yet
# handed to SCTP, resume when it has drained to LOW_WATER. This bounds our memory whatever the
# file size, and the gap between the two keeps us from waking up for every frame.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# Limits a receiver enforces before writing anything.
MAX_FILES = 10_000
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


def log(*args):
    print("[aiortc_peer]", *args, file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


class PeerError(Exception):
    """The run failed; the message says why."""


class Reject(Exception):
    """A manifest we refuse: becomes a transfer_reject with this code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def hash_file(path):
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def derived_transfer_id(files):
    """Same derivation as Manifest::derived_id in Rust: re-sending the same files after a cut
    yields the same id, so the receiver can resume from its .part files."""
    h = blake3.blake3()
    for f in files:
        h.update(f["name"].encode())
        h.update(b"\0")
        h.update(f["size"].to_bytes(8, "big"))
        h.update(f["blake3"].encode())
    return int.from_bytes(h.digest()[:4], "big")


def is_u32(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32


# --- Signaling --------------------------------------------------------------------------------


class Signaling:
    """JSON messages over the signaling server's WebSocket."""

    def __init__(self, ws):
        self.ws = ws

    async def send(self, msg):
        await self.ws.send(json.dumps(msg))

    async def recv(self, kind, sender=None):
        """Next message of type `kind` (from `sender` if given); other messages (presence
        notices, replies to others' requests) are skipped, but a server error ends the run."""
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("type") == "error":
                raise PeerError(f"signaling server error: {msg}")
            if msg.get("type") == kind and (sender is None or msg.get("sender") == sender):
                return msg

    async def register(self, args):
        if args.api_key:
            reg = {"type": "register", "role": "worker", "api_key": args.api_key}
        else:
            reg = {"type": "register", "role": "client", "jwt": args.jwt, "room_id": args.room}
        await self.send(reg)
        return (await self.recv("registered_auth"))["peer_id"]

    async def relay_candidates(self, pc, sender):
        """Applies trickled ICE candidates from `sender` until cancelled. Our Rust peer puts its
        candidates in the SDP, but trickling is allowed by the protocol, so accept it."""
        while True:
            try:
                msg = await self.recv("candidate", sender)
            except PeerError as e:
                # Once connected, a server error concerns nothing we wait for: report, go on.
                log(e)
                continue
            c = msg.get("candidate")
            line = c.get("candidate") if isinstance(c, dict) else c
            if not isinstance(line, str) or not line.strip():
                continue
            cand = candidate_from_sdp(line.strip().removeprefix("a=").removeprefix("candidate:"))
            cand.sdpMid = c.get("sdpMid") if isinstance(c, dict) else None
            cand.sdpMLineIndex = c.get("sdpMLineIndex", 0) if isinstance(c, dict) else 0
            await pc.addIceCandidate(cand)


# --- The WebRTC link: one peer connection with the `ctl` and `bulk` channels --------------------


class Link:
    def __init__(self, pc):
        self.pc = pc
        self.ctl = None
        self.bulk = None
        self.ctl_inbox = asyncio.Queue()
        # Set by a receiver. Frames are handled synchronously as they arrive, so nothing piles
        # up in memory between aiortc and the disk.
        self.on_frame = None
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()

        @pc.on("connectionstatechange")
        def on_state():
            log("connection state:", pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                self.closed.set()
                if not self.opened.done():
                    self.opened.set_exception(PeerError(f"connection {pc.connectionState} before opening"))

    def adopt(self, ch):
        """Takes a channel we created (offerer) or that the remote opened (answerer). Handlers
        are attached at once: aiortc drops messages that arrive while nobody listens."""
        if ch.label == "ctl":
            self.ctl = ch
            ch.on("message", self._on_ctl)
        elif ch.label == "bulk":
            self.bulk = ch
            ch.on("message", self._on_bulk)
        else:
            log("ignoring unexpected channel", repr(ch.label))
            return
        ch.on("open", self._check_open)
        ch.on("close", self.closed.set)
        self._check_open()

    def _check_open(self):
        both = self.ctl is not None and self.bulk is not None
        if both and self.ctl.readyState == "open" and self.bulk.readyState == "open" and not self.opened.done():
            if not (self.ctl.ordered and self.bulk.ordered):
                self.opened.set_exception(PeerError("the remote opened an unordered channel"))
            else:
                self.opened.set_result(None)

    def _on_ctl(self, msg):
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        try:
            m = json.loads(msg)
        except ValueError:
            log("ignoring control message that is not JSON:", msg[:200])
            return
        if isinstance(m, dict):
            self.ctl_inbox.put_nowait(m)

    def _on_bulk(self, data):
        if isinstance(data, str):
            log("ignoring text on the bulk channel")
        elif self.on_frame is None:
            log("ignoring a bulk frame: no transfer is being received")
        else:
            self.on_frame(data)

    def send_ctl(self, msg):
        self.ctl.send(json.dumps(msg))

    async def next_transfer_msg(self, transfer_id=None):
        """Next transfer_* control message (for `transfer_id` if given). Other control messages
        (e.g. jobs) are not ours to handle here; they are logged and dropped."""
        while True:
            m = await self.ctl_inbox.get()
            if not str(m.get("type", "")).startswith("transfer_"):
                log("ignoring control message", m.get("type"))
                continue
            if transfer_id is None or m.get("transfer_id") == transfer_id:
                return m

    async def close(self, grace):
        """Waits up to `grace` seconds for the remote to close first (so our last control
        message is surely delivered), then closes."""
        try:
            await asyncio.wait_for(self.closed.wait(), grace)
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except asyncio.TimeoutError:
            log("closing the peer connection timed out")


def new_peer_connection():
    # No ICE servers: aiortc would otherwise ask a public STUN server for a reflexive address,
    # and these tests must not leave the machine.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def offer_link(sig, target):
    pc = new_peer_connection()
    link = Link(pc)
    # Same shape as our Rust offerer: two reliable ordered channels, `ctl` then `bulk`, opened
    # in-band (DCEP) once SCTP is up.
    link.adopt(pc.createDataChannel("ctl", ordered=True))
    link.adopt(pc.createDataChannel("bulk", ordered=True))
    # aiortc gathers every candidate during setLocalDescription, so the offer carries them all.
    await pc.setLocalDescription(await pc.createOffer())
    await sig.send({"type": "offer", "target": target, "sdp": pc.localDescription.sdp})
    answer = await sig.recv("answer", target)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    return link, target


async def answer_link(sig):
    offer = await sig.recv("offer")
    remote = offer["sender"]
    pc = new_peer_connection()
    link = Link(pc)
    pc.on("datachannel", link.adopt)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    await sig.send({"type": "answer", "target": remote, "sdp": pc.localDescription.sdp})
    return link, remote


# --- Sending ----------------------------------------------------------------------------------


def build_manifest(paths):
    """A file goes under its own name; a directory with every regular file below it, under
    DIRNAME/relative/path. Symlinks are skipped: they could point anywhere."""
    entries = []

    def add(name, path):
        size = os.stat(path).st_size
        entries.append({"name": name, "path": path, "size": size, "blake3": hash_file(path)})

    for p in paths:
        base = os.path.basename(os.path.normpath(p))
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in files:
                    full = os.path.join(root, f)
                    if stat.S_ISREG(os.lstat(full).st_mode):
                        found.append(full)
            for full in sorted(found):
                rel = os.path.relpath(full, p).replace(os.sep, "/")
                add(f"{base}/{rel}", full)
        else:
            add(base, p)
    return entries


async def wait_any(*events):
    """Returns once any of the asyncio.Events is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def send_files(link, paths):
    entries = build_manifest(paths)
    files = [{"name": e["name"], "size": e["size"], "blake3": e["blake3"]} for e in entries]
    tid = derived_transfer_id(files)
    total = sum(e["size"] for e in entries)
    log(f"offering transfer {tid:#010x}: {len(files)} files, {total} bytes")
    link.send_ctl({"type": "transfer_offer", "transfer_id": tid, "manifest": {"files": files}})

    reply = await link.next_transfer_msg(tid)
    if reply["type"] == "transfer_reject":
        raise PeerError(f"transfer rejected: {reply.get('code')}: {reply.get('message')}")
    if reply["type"] != "transfer_accept":
        raise PeerError(f"expected transfer_accept, got {reply}")
    committed = reply.get("committed")
    if not isinstance(committed, list) or len(committed) != len(entries):
        raise PeerError(f"transfer_accept lists the wrong number of files: {reply}")
    for c, e in zip(committed, entries):
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= e["size"]:
            raise PeerError(f"transfer_accept has an offset outside {e['name']}: {reply}")

    # The receiver's acks, per-file results and the final transfer_complete come while we still
    # stream, so a separate task collects them.
    results = {}
    remote_stop = asyncio.Event()
    outcome = {}

    async def collect():
        try:
            await collect_until_over()
        finally:
            remote_stop.set()  # wake the streaming loop whatever ended the collection

    async def collect_until_over():
        while True:
            m = await link.next_transfer_msg(tid)
            if m["type"] == "transfer_file_result":
                if not (is_u32(m.get("file")) and m["file"] < len(entries)):
                    raise PeerError(f"transfer_file_result for an unknown file: {m}")
                results[m["file"]] = (m.get("ok") is True, m.get("error"))
                if m.get("ok") is not True:
                    log("receiver failed file", m.get("file"), m.get("error"))
            elif m["type"] == "transfer_complete":
                outcome["complete"] = m
                return
            elif m["type"] == "transfer_cancel":
                outcome["cancel"] = m.get("reason")
                return

    collector = asyncio.ensure_future(collect())
    start = time.monotonic()
    sent = 0
    stalls = 0  # times we waited for aiortc to drain: proves the bounded-memory path ran
    bulk = link.bulk
    bulk.bufferedAmountLowThreshold = LOW_WATER
    drained = asyncio.Event()
    bulk.on("bufferedamountlow", drained.set)
    try:
        for i, e in enumerate(entries):
            offset = committed[i]
            if offset >= e["size"]:
                continue
            with open(e["path"], "rb") as f:
                f.seek(offset)
                while offset < e["size"] and not remote_stop.is_set():
                    data = f.read(min(CHUNK, e["size"] - offset))
                    if not data:
                        reason = f"{e['name']} shrank while sending"
                        link.send_ctl({"type": "transfer_cancel", "transfer_id": tid, "reason": reason})
                        raise PeerError(reason)
                    bulk.send(HEADER.pack(FRAME_VERSION, KIND_DATA, 0, tid, i, offset) + data)
                    offset += len(data)
                    sent += len(data)
                    if bulk.bufferedAmount > HIGH_WATER:
                        # Cleared before waiting and nothing runs in between, so the crossing
                        # below LOW_WATER cannot be missed.
                        drained.clear()
                        stalls += 1
                        await wait_any(drained, remote_stop, link.closed)
                        if link.closed.is_set():
                            raise PeerError("connection closed while sending")
        await wait_any(remote_stop, link.closed)
    finally:
        collector.cancel()
    seconds = time.monotonic() - start
    if "cancel" in outcome:
        raise PeerError(f"receiver cancelled: {outcome['cancel']}")
    if "complete" not in outcome:
        raise PeerError("connection closed before transfer_complete")
    if collector.done() and not collector.cancelled() and collector.exception():
        raise collector.exception()
    failed = [[entries[i]["name"], err] for i, (ok, err) in sorted(results.items()) if not ok]
    missing = [e["name"] for i, e in enumerate(entries) if i not in results]
    ok = not failed and not missing and outcome["complete"].get("failed") == 0
    return {
        "ok": ok,
        "transfer_id": tid,
        "bytes": sent,
        "total_bytes": total,
        "resumed_bytes": sum(committed),
        "seconds": round(seconds, 3),
        "stalls": stalls,
        "files": [e["name"] for i, e in enumerate(entries) if results.get(i, (False,))[0]],
        "failed": failed + [[n, "no transfer_file_result"] for n in missing],
    }


# --- Receiving --------------------------------------------------------------------------------


def check_name(name):
    """A name must stay inside the destination and mean the same file on every common platform
    (the rules of validate_name in core/src/transfer.rs)."""
    if not isinstance(name, str) or not name:
        raise Reject("UNSAFE_NAME", f"{name!r}: empty or not a string")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise Reject("UNSAFE_NAME", f"{name[:100]!r}: longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/") or "\\" in name or ":" in name:
        raise Reject("UNSAFE_NAME", f"{name!r}: absolute, or has a backslash or colon")
    # Cc: NUL and other control characters; Cf: bidi controls and zero-width characters, which
    # make a name display as something else.
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        raise Reject("UNSAFE_NAME", f"{name!r}: control or invisible character")
    for comp in name.split("/"):
        if comp in ("", ".", ".."):
            raise Reject("UNSAFE_NAME", f"{name!r}: empty, '.' or '..' component")
        if len(comp.encode()) > MAX_COMPONENT_BYTES:
            raise Reject("UNSAFE_NAME", f"{name!r}: component longer than {MAX_COMPONENT_BYTES} bytes")
        if comp.endswith((".", " ")) or comp.split(".")[0].rstrip().upper() in WINDOWS_DEVICES:
            raise Reject("UNSAFE_NAME", f"{name!r}: trailing dot/space or Windows device name")


def check_manifest(manifest):
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        raise Reject("BAD_MANIFEST", "manifest.files must be a list")
    if len(files) > MAX_FILES:
        raise Reject("TOO_MANY_FILES", f"{len(files)} files; the limit is {MAX_FILES}")
    seen = set()
    for f in files:
        if not isinstance(f, dict):
            raise Reject("BAD_MANIFEST", "a manifest entry is not an object")
        check_name(f.get("name"))
        size, digest = f.get("size"), f.get("blake3")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**64:
            raise Reject("BAD_MANIFEST", f"{f['name']}: bad size")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise Reject("BAD_MANIFEST", f"{f['name']}: blake3 must be 64 lowercase hex digits")
        # Case-insensitive file systems would merge names that differ only in case.
        key = f["name"].lower()
        if key in seen:
            raise Reject("DUPLICATE_NAME", f"{f['name']} listed twice")
        seen.add(key)
    # A file and a directory of the same name cannot both exist.
    for f in files:
        comps = f["name"].lower().split("/")
        for i in range(1, len(comps)):
            if "/".join(comps[:i]) in seen:
                raise Reject("DUPLICATE_NAME", f"{f['name']}: a parent is also a file")
    return files


def prepare_paths(dest, name):
    """Creates the parent directories of `name` inside `dest`, refusing any path that goes
    through a symlink (a planted link must not redirect our writes out of `dest`)."""
    cur = dest
    comps = name.split("/")
    for i, comp in enumerate(comps):
        cur = os.path.join(cur, comp)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if i + 1 < len(comps):
                os.mkdir(cur)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise Reject("UNSAFE_NAME", f"{name}: path goes through a symlink")
        if i + 1 < len(comps) and not stat.S_ISDIR(st.st_mode):
            raise Reject("UNSAFE_NAME", f"{name}: a parent is not a directory")
    final = os.path.join(dest, *comps)
    real_dest = os.path.realpath(dest)
    if os.path.commonpath([real_dest, os.path.realpath(os.path.dirname(final))]) != real_dest:
        raise Reject("UNSAFE_NAME", f"{name}: resolves outside the destination")
    return final + ".part", final


class Incoming:
    """The receiving side of one transfer: writes frames to NAME.part, verifies each finished
    file's BLAKE3, renames it, and reports to the sender."""

    def __init__(self, link, tid, files, dest):
        self.link, self.tid, self.files, self.dest = link, tid, files, dest
        self.parts, self.finals, self.next = [], [], []
        for f in files:
            part, final = prepare_paths(dest, f["name"])
            self.parts.append(part)
            self.finals.append(final)
            # A .part left by an interrupted attempt is resumed; one longer than the file
            # cannot be a prefix of it and is started over.
            try:
                have = os.lstat(part)
                if not stat.S_ISREG(have.st_mode):
                    raise Reject("UNSAFE_NAME", f"{f['name']}: its .part is not a regular file")
                held = have.st_size if have.st_size <= f["size"] else 0
            except FileNotFoundError:
                held = 0
            self.next.append(held)
        self.committed = list(self.next)
        self.last_ack = list(self.next)
        self.handle = None  # (file index, fd) of the .part being written
        self.results = {}
        self.received = 0
        self.tasks = set()
        self.done = asyncio.get_running_loop().create_future()

    def start(self):
        # Install the frame handler before accepting: the sender starts streaming as soon as
        # transfer_accept arrives.
        self.link.on_frame = self.on_frame
        self.link.send_ctl({"type": "transfer_accept", "transfer_id": self.tid, "committed": self.committed})
        for i, f in enumerate(self.files):
            if self.next[i] == f["size"]:
                self.verify(i)  # empty, or fully held from an earlier attempt: no frames come

    def fail(self, reason):
        """A protocol error ends the transfer: tell the sender, keep .part files for a resume."""
        if not self.done.done():
            self.link.send_ctl({"type": "transfer_cancel", "transfer_id": self.tid, "reason": reason})
            self.done.set_exception(PeerError(reason))
        self.link.on_frame = None

    def on_frame(self, frame):
        if self.done.done():
            return
        if len(frame) < HEADER.size:
            return self.fail("protocol error: frame shorter than its header")
        version, kind, reserved, tid, i, offset = HEADER.unpack_from(frame)
        if version != FRAME_VERSION or kind != KIND_DATA or reserved != 0:
            return self.fail(f"protocol error: unknown frame version/kind {version}/{kind}")
        if tid != self.tid:
            return self.fail(f"protocol error: frame for transfer {tid:#x}, expected {self.tid:#x}")
        if i >= len(self.files) or i in self.results or self.next[i] == self.files[i]["size"]:
            return self.fail(f"protocol error: frame for file {i}, which is unknown or complete")
        payload = memoryview(frame)[HEADER.size :]
        end = offset + len(payload)
        # Frames of a file come in order on a reliable ordered channel, starting at the offset
        # we committed: anything else is a broken sender.
        if offset != self.next[i] or end > self.files[i]["size"]:
            return self.fail(f"protocol error: file {i}: frame at {offset}, expected {self.next[i]}")
        if self.handle is None or self.handle[0] != i:
            self.close_handle()
            # O_NOFOLLOW: never write through a symlink planted where the .part goes.
            fd = os.open(self.parts[i], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            self.handle = (i, fd)
        os.pwrite(self.handle[1], payload, offset)
        self.next[i] = end
        self.received += len(payload)
        if end - self.last_ack[i] >= ACK_EVERY or end == self.files[i]["size"]:
            self.last_ack[i] = end
            self.link.send_ctl({"type": "transfer_ack", "transfer_id": self.tid, "file": i, "offset": end})
        if end == self.files[i]["size"]:
            self.close_handle()
            self.verify(i)

    def close_handle(self):
        if self.handle is not None:
            os.close(self.handle[1])
            self.handle = None

    def verify(self, i):
        # Hashing a big file takes a while: do it off the event loop so SCTP keeps flowing.
        task = asyncio.ensure_future(self._verify(i))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _verify(self, i):
        f, part, final = self.files[i], self.parts[i], self.finals[i]
        try:
            if not os.path.lexists(part):
                # An empty file gets no frames: create its .part so there is something to hash.
                os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
            digest = await asyncio.to_thread(hash_file, part)
            if digest == f["blake3"]:
                if os.path.islink(final) or os.path.isdir(final):
                    raise OSError("destination is a symlink or directory")
                os.replace(part, final)
                ok, error = True, None
            else:
                os.remove(part)
                ok, error = False, "BLAKE3 mismatch: the received bytes differ from the sender's file"
        except OSError as e:
            ok, error = False, f"cannot verify or rename: {e}"
        if self.done.done():
            return
        self.results[i] = (ok, error)
        self.link.send_ctl({"type": "transfer_file_result", "transfer_id": self.tid, "file": i, "ok": ok, "error": error})
        if len(self.results) == len(self.files):
            failed = sum(1 for ok, _ in self.results.values() if not ok)
            self.link.send_ctl(
                {"type": "transfer_complete", "transfer_id": self.tid, "ok": len(self.files) - failed, "failed": failed}
            )
            self.done.set_result(None)

    async def watch_cancel(self):
        """Ends the transfer if the sender cancels it."""
        m = await self.link.next_transfer_msg(self.tid)
        while m["type"] != "transfer_cancel":
            m = await self.link.next_transfer_msg(self.tid)
        if not self.done.done():
            self.done.set_exception(PeerError(f"sender cancelled: {m.get('reason')}"))


async def receive_files(link, dest):
    os.makedirs(dest, exist_ok=True)
    offer = await link.next_transfer_msg()
    while offer["type"] != "transfer_offer":
        offer = await link.next_transfer_msg()
    tid = offer.get("transfer_id")
    if not is_u32(tid):
        raise PeerError(f"transfer_offer has a bad transfer_id: {tid!r}")
    try:
        files = check_manifest(offer.get("manifest"))
        rx = Incoming(link, tid, files, dest)
    except (Reject, OSError) as e:
        code = e.code if isinstance(e, Reject) else "IO"
        link.send_ctl({"type": "transfer_reject", "transfer_id": tid, "code": code, "message": str(e)})
        raise PeerError(f"rejected the offer: {code}: {e}") from e
    log(f"receiving transfer {tid:#010x}: {len(files)} files")
    start = time.monotonic()
    rx.start()
    watcher = asyncio.ensure_future(rx.watch_cancel())
    closed = asyncio.ensure_future(link.closed.wait())
    try:
        await asyncio.wait([rx.done, closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        closed.cancel()
        rx.close_handle()
        link.on_frame = None
    if not rx.done.done():
        raise PeerError("connection closed mid-transfer; .part files are kept for a resume")
    rx.done.result()  # raises if the transfer was cancelled
    seconds = time.monotonic() - start
    failed = [[files[i]["name"], err] for i, (ok, err) in sorted(rx.results.items()) if not ok]
    return {
        "ok": not failed,
        "transfer_id": tid,
        "bytes": rx.received,
        "total_bytes": sum(f["size"] for f in files),
        "resumed_bytes": sum(rx.committed),
        "seconds": round(seconds, 3),
        "files": [files[i]["name"] for i, (ok, _) in sorted(rx.results.items()) if ok],
        "failed": failed,
    }


# --- Main -------------------------------------------------------------------------------------


async def run(args):
    async with websockets.connect(args.ws) as ws:
        sig = Signaling(ws)
        peer_id = await sig.register(args)
        emit({"event": "registered", "peer_id": peer_id})
        if args.offer_to:
            link, remote = await offer_link(sig, args.offer_to)
        else:
            link, remote = await answer_link(sig)
        trickle = asyncio.ensure_future(sig.relay_candidates(link.pc, remote))
        try:
            await link.opened
            log("channels open with", remote)
            if args.send:
                result = await send_files(link, args.send)
                # transfer_complete was the receiver's last word: nothing of ours is in flight.
                await link.close(grace=0)
            else:
                result = await receive_files(link, args.receive)
                # Our transfer_complete may still be in flight: let the sender close first.
                await link.close(grace=5)
        finally:
            trickle.cancel()
        return {"event": "result", "peer_id": peer_id, "remote": remote, **result}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ws", required=True, help="signaling WebSocket URL, ws://HOST:PORT/ws")
    p.add_argument("--jwt", help="register as a client with this JWT (needs --room)")
    p.add_argument("--room", help="room id, for a client")
    p.add_argument("--api-key", help="register as a worker with this room token")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--offer-to", metavar="PEER_ID", help="offer a connection to this peer")
    how.add_argument("--answer", action="store_true", help="answer the first offer that arrives")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--send", nargs="+", metavar="PATH", help="send these files and directories")
    what.add_argument("--receive", metavar="DIR", help="receive one transfer into this directory")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    args = p.parse_args()
    if not args.api_key and not (args.jwt and args.room):
        p.error("give --api-key (worker) or --jwt and --room (client)")

    # aioice offers every interface's address except loopback. These tests must keep all
    # traffic on 127.0.0.1, so offer exactly that (the Rust side binds 127.0.0.1 too).
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

    try:
        result = asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except asyncio.TimeoutError:
        emit({"event": "result", "ok": False, "error": f"timed out after {args.timeout} s"})
        log(f"timed out after {args.timeout} s")
        return 2
    except (PeerError, OSError, websockets.WebSocketException) as e:
        emit({"event": "result", "ok": False, "error": str(e)})
        log("failed:", e)
        return 1
    emit(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
