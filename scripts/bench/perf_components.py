#!/usr/bin/env python3
"""Sums `perf script` call-graph samples (cpu-clock) of a server by component.

    perf script -i perf.data -F comm,tid,ip,sym,dso | perf_components.py [US_PER_DELIVERY]

Each sample is one tick of a thread on a CPU. It is charged to the innermost frame of its call
chain (leaf first) that matches one of ANCHORS: so a `sendto` made by the session writer is the
writer's (kernel part), a `Notify::notify_one` inside the hub's fan-out is the hub's, and what
has no anchor but tokio/mio frames is the runtime (scheduler, I/O driver, parking). WEAK
anchors (axum, hyper, tungstenite, the rest of chatbus-ws) count only when no ANCHORS frame is
in the chain (the writer's socket write goes through tungstenite: it is the writer's). The
user part of the session writer is also split by the crate of its leaf frame. Kernel samples
are also split by the system call they are in. US_PER_DELIVERY (the server's CPU µs
per delivery over the same window, from the generator's report) turns shares into µs.
"""
import collections
import re
import sys

ANCHORS = [
    ("JSON (serde_json)", re.compile(r"serde_json::")),
    ("hub (chatbus-core)", re.compile(r"chatbus_core::hub")),
    ("redis (client, subscriber, broker)", re.compile(r"chatbus_redis|\bredis::|<redis::")),
    ("ws session writer", re.compile(r"session::writer|Writer>::write|Writer::write")),
    ("ws session reader", re.compile(r"session::reader|Reader>::|Reader::")),
    ("floor: fan-out (hub)", re.compile(r"floor::hub")),
    ("floor: connection (read, writev)", re.compile(r"floor::conn|floor::frame")),
    ("floor: other", re.compile(r"\bfloor::")),
]
WEAK = [
    ("ws other (axum, hyper, tungstenite, session)", re.compile(r"chatbus_ws|axum::|hyper::|tungstenite::")),
    ("chatbus other", re.compile(r"chatbus_core|chatbus::")),
]
CRATE = re.compile(r"^<?&?(?:mut )?([a-z_][a-z0-9_]*)::")
RUNTIME = re.compile(r"tokio::|mio::|std::sys::|parking_lot")
ALLOC = re.compile(r"^(malloc|free|realloc|calloc|cfree|_int_malloc|_int_free|_int_realloc|"
                   r"malloc_consolidate|unlink_chunk|sysmalloc|__libc_malloc|__libc_free|"
                   r"__libc_calloc|__libc_realloc|tcache_|__rust_alloc|__rust_dealloc|__rdl_)")
MEM = re.compile(r"^(__memcpy|__memmove|__memset|memcpy|memmove|memset)")
SYSCALL = re.compile(r"__(?:x64|do)_sys_(\w+)|\b(?:do_|__sys_|ksys_)(writev|readv|sendto|recvfrom|"
                     r"sendmsg|recvmsg|epoll_wait|futex|write|read)\b")
FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")


def samples(lines):
    head, frames = None, []
    for line in lines:
        if not line.strip():
            if head is not None:
                yield head, frames
            head, frames = None, []
        elif not line[0].isspace():
            if head is not None:
                yield head, frames
            head, frames = line.split()[0], []
        else:
            m = FRAME.match(line)
            if m:
                sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(2))
                frames.append((sym, m.group(3)))
    if head is not None:
        yield head, frames


def short(sym):
    """A frame's name without generic arguments and closure suffixes, at most 90 characters."""
    out, depth = [], 0
    for ch in sym:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    name = "".join(out).replace("::{{closure}}", "").replace("::{closure#0}", "")
    return (name or sym)[:90]


def main():
    us = float(sys.argv[1]) if len(sys.argv) > 1 else None
    comp = collections.Counter()
    threads = collections.Counter()
    sysc = collections.Counter()
    writer_leaf = collections.Counter()
    anchor = collections.Counter()
    leaf_alloc = leaf_mem = total = kern = 0
    for comm, frames in samples(sys.stdin):
        if not frames:
            continue
        total += 1
        threads[comm] += 1
        kernel = "kernel" in frames[0][1] or frames[0][1].startswith("[k")
        kern += kernel
        if kernel:
            name = next((m.group(1) or m.group(2) for s, _ in frames if (m := SYSCALL.search(s))), None)
            sysc[name or "(no syscall: irq, softirq, scheduler)"] += 1
        else:
            if ALLOC.match(frames[0][0]):
                leaf_alloc += 1
            elif MEM.match(frames[0][0]):
                leaf_mem += 1
        what = None
        for anchors in (ANCHORS, WEAK):
            for sym, _ in frames:
                what = next((label for label, rx in anchors if rx.search(sym)), None)
                if what:
                    anchor[(what, "kernel" if kernel else "user", short(sym))] += 1
                    break
            if what:
                break
        if what == "ws session writer" and not kernel:
            m = CRATE.match(frames[0][0])
            dso = frames[0][1]
            writer_leaf[m.group(1) if m else ("libc" if "libc" in dso else frames[0][0][:40])] += 1
        if what is None:
            what = "runtime (tokio, mio, std)" if any(RUNTIME.search(s) for s, _ in frames) else "other"
        comp[(what, "kernel" if kernel else "user")] += 1
    if not total:
        print("no samples")
        return

    def row(label, n, extra=""):
        cells = [label, str(n), f"{100 * n / total:.1f}"]
        if us is not None:
            cells.append(f"{us * n / total:.2f}")
        print("| " + " | ".join(cells) + " |" + extra)

    unit = " | µs/delivery" if us is not None else ""
    sep = "|---" * (4 if us is not None else 3) + "|"
    print(f"samples {total}; kernel {100 * kern / total:.1f} %, user {100 * (total - kern) / total:.1f} %")
    print(f"\n| component | samples | %{unit} |\n{sep}")
    labels = sorted({c for c, _ in comp}, key=lambda c: -(comp[(c, 'user')] + comp[(c, 'kernel')]))
    for c in labels:
        for mode in ("user", "kernel"):
            if comp[(c, mode)]:
                row(f"{c}, {mode}", comp[(c, mode)])
    print(f"\n| user leaf | samples | %{unit} |\n{sep}")
    row("malloc/free (glibc, any caller)", leaf_alloc)
    row("memcpy/memmove/memset", leaf_mem)
    if writer_leaf:
        print(f"\n| ws session writer, user, by the crate of the leaf frame | samples | %{unit} |\n{sep}")
        for name, n in writer_leaf.most_common(10):
            row(name, n)
    print(f"\n| innermost anchor frame (top 15) | samples | %{unit} |\n{sep}")
    for (what, mode, sym), n in anchor.most_common(15):
        row(f"{what.split(' (')[0]}, {mode}: `{sym}`", n)
    print(f"\n| kernel, by system call | samples | %{unit} |\n{sep}")
    for name, n in sysc.most_common(10):
        row(name, n)
    print(f"\n| thread | samples | %{unit} |\n{sep}")
    for name, n in threads.most_common(8):
        row(name, n)


if __name__ == "__main__":
    main()
