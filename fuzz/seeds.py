#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*.

A few valid inputs per target, so libFuzzer starts from the accepted paths instead of having to
find the version byte, the tags and the JSON shapes by itself. Run from anywhere:
`python3 fuzz/seeds.py`; the fuzzer then grows (and `cargo fuzz cmin` shrinks) the corpus.
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# chatbus-core/src/backend/codec.rs, version 1.
def envelope(room, payload, ephemeral=False, sender=None, cursor=None, msg_id=7, ts=1_700_000_000_000):
    flags = (1 if ephemeral else 0) | (2 if sender is not None else 0) | (4 if cursor else 0)
    out = bytes([1, flags]) + msg_id.to_bytes(16, "big") + struct.pack(">Q", ts)
    out += bytes([len(room)]) + room
    if sender is not None:
        out += struct.pack(">H", len(sender)) + sender
    if cursor:
        out += struct.pack(">IQ", *cursor)
    return out + struct.pack(">I", len(payload)) + payload


write("envelope_decode", "plain", envelope(b"general", b"hello"))
write("envelope_decode", "from", envelope(b"general", b"Mhi", sender=b"alice"))
write("envelope_decode", "cursor", envelope(b"dm.a.b", b"", sender=b"", cursor=(3, 1 << 40)))
write("envelope_decode", "ephemeral", envelope(b"r:1", b"T\x00", ephemeral=True))

# chatbus-ws/src/payload.rs.
def short(s):
    return bytes([len(s)]) + s


write("payload_decode", "message", b"M" + short(b"Ann") + "hi \u2713".encode())
write("payload_decode", "message-noname", b"M\x00hello")
write("payload_decode", "typing", b"T" + short(b"Ann"))
write("payload_decode", "presence",
      b"P" + (7 << 100).to_bytes(16, "big") + struct.pack(">QBI", 9, 1, 2) + short(b"a") + short("b\u00e9".encode()))
write("payload_decode", "direct",
      b"D" + short(b"Ann") + short(b"bob") + short(b"dm.a.b") + short(b"0-7") + b"\x10" + (42 << 64).to_bytes(16, "big") + b"psst")
write("payload_decode", "direct-plain", b"D\x00" + short(b"bob") + b"\x00\x00\x00hey")
write("payload_decode", "probe", b"Q" + short(b"bob"))
write("payload_decode", "kick", b"K" + short(b"bob"))
write("payload_decode", "status", b"S" + (3 << 90).to_bytes(16, "big") + struct.pack(">QB", 4, 1) + short(b"ann"))

# chatbus-ws/src/protocol/mod.rs, docs/protocol.md.
frames = {
    "join": {"type": "join", "room": "general", "since": "0-41", "client_id": 1},
    "leave": {"type": "leave", "room": "general", "client_id": "c1"},
    "send": {"type": "send", "room": "general", "body": "hello \u2713", "client_id": 2},
    "direct": {"type": "send", "to": "bob", "body": "psst"},
    "watch": {"type": "watch", "users": ["bob", "carol", "bob"]},
    "unwatch": {"type": "unwatch", "users": ["bob"]},
    "typing": {"type": "typing", "room": "general"},
    "history": {"type": "history", "room": "general", "before": "2-100", "limit": 50, "client_id": 3.5},
    "ping": {"type": "ping"},
    "refresh": {"type": "refresh", "token": "a.b.c"},
}
for name, frame in frames.items():
    write("client_frame", name, json.dumps(frame, ensure_ascii=False).encode())
write("client_frame", "escapes", b'{"type":"send","room":"general","body":"\\u00e9\\n\\ud83d\\ude00"}')
