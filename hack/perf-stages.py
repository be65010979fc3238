#!/usr/bin/env python3
"""Attributes each sample of `perf script -F comm,tid,ip,sym,dso` (dwarf call graphs) to one
stage of serving a `secret.get`: the innermost frame that names a stage wins, except that
allocation, copies and system calls are stages of their own wherever they happen. Prints a
table of shares of all samples of the process. Used by hack/profile-get.sh."""
import collections
import re
import sys

# (stage, regex on the symbol), tried on each frame from the leaf outwards. The first rule that
# matches any frame, innermost first, names the sample's stage.
LEAF_RULES = [
    ("allocation (malloc, free)", r"^(malloc|free|cfree|realloc|calloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|__libc_malloc|__libc_free|__libc_calloc|__libc_realloc|tcache_|unlink_chunk|alloc::raw_vec::finish_grow|__rust_alloc|__rust_dealloc|__rust_realloc|sysmalloc)"),
    ("copies (memcpy, memmove)", r"^(__memmove|__memcpy|memcpy|memmove)"),
]
# A sample in the kernel is named by the system call it is in, read off the first user-space
# frame (the libc wrapper: the kernel's own entry points are inlined), else by the kernel frame.
SYSCALL_RULES = [
    ("audit: fdatasync and write (kernel)", r"fdatasync|fsync|pwritev2|pwrite"),
    ("socket write (kernel, loopback TCP)", r"writev|__libc_write|__write|send"),
    ("socket read (kernel)", r"__libc_read|__read|recv"),
    ("scheduling: epoll, futex, wake-ups (kernel)", r"epoll|^syscall$|futex|pthread_cond|lll_lock|sched_yield|nanosleep|clock_nanosleep"),
]
KERNEL_RULES = [
    ("audit: fdatasync and write (kernel)", r"ext4|jbd2|virtio|blk_|bio_|iowrite"),
    ("socket write (kernel, loopback TCP)", r"tcp_|sock_|skb|ip_|net_rx|napi|netif|__dev_queue"),
    ("scheduling: epoll, futex, wake-ups (kernel)", r"finish_task_switch|schedule|try_to_wake_up|_raw_spin_unlock_irq|futex|ep_poll"),
]
STAGE_RULES = [
        ("audit: hash chain (SHA-256)", r"audit::chain::"),
    ("open: HKDF + ChaCha20-Poly1305 + decode", r"crypto::seal::|crypto::aead::|hkdf::|ring_core_.*chacha|poly1305"),
    ("authentication (token)", r"backends::local::tokens|TokenAuthorizer|authenticate"),
    ("store lookup", r"claw_secrets::store::"),
    ("audit: enqueue and wait", r"audit::writer::|AuditLog::append"),
    ("command core and dispatch", r"invoke::command_core|invoke::dispatch|invoke::access"),
    ("request JSON parsing", r"invoke::params|invoke::protocol.*de|serde_json::de"),
    ("response JSON", r"serde_json::ser"),
    ("HTTP/1 parse and encode (hyper)", r"hyper::proto::h1"),
    ("routing, body, response (axum, tower, hyper)", r"axum::|tower::|tower_http|hyper::|http_body"),
    ("tokio scheduling", r"tokio::runtime|tokio::sync|parking_lot|std::sys::.*futex|mio::"),
]

def stage_of(comm, frames):
    syms = [s for s, _ in frames]
    in_kernel = bool(frames) and frames[0][1].startswith("[kernel")
    if in_kernel:
        user = next((s for s, dso in frames if not dso.startswith("[kernel")), None)
        if comm == "audit-writer" and any(re.search(KERNEL_RULES[0][1], s) for s in syms):
            return KERNEL_RULES[0][0]
        for name, rx in SYSCALL_RULES:
            if user and re.search(rx, user):
                if comm == "audit-writer" and not name.startswith(("audit", "scheduling")):
                    return "audit: fdatasync and write (kernel)"
                return name
        for name, rx in KERNEL_RULES:
            if re.search(rx, syms[0]):
                return name
        return "kernel: interrupts, softirq, other"
    for name, rx in LEAF_RULES:
        if syms and re.search(rx, syms[0]):
            return name
    for s in syms:
        for name, rx in STAGE_RULES:
            if re.search(rx, s):
                if comm == "audit-writer" and not name.startswith("audit"):
                    return "audit: serialize record, the rest of the writer"
                return name
    return "other"

def samples(lines):
    comm, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = None, []
        elif not line.startswith(("\t", " ")):
            comm = line.split()[0]
            frames = []
        else:
            m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
            if m:
                sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
                frames.append((sym, m.group(2)))
    if comm is not None:
        yield comm, frames

by_stage = collections.Counter()
by_thread = collections.Counter()
unmatched = collections.Counter()
total = 0
for comm, frames in samples(sys.stdin):
    stage = stage_of(comm, frames)
    by_stage[stage] += 1
    by_thread[comm] += 1
    total += 1
    if stage in ("other", "audit: serialize record, the rest of the writer") and frames:
        unmatched[frames[0][0][:80]] += 1
if not total:
    sys.exit("no samples")
print(f"{total} samples")
print("| Share | Stage |")
print("| --- | --- |")
for stage, n in by_stage.most_common():
    print(f"| {100 * n / total:.1f} % | {stage} |")
print("threads: " + ", ".join(f"{c} {100 * n / total:.0f} %" for c, n in by_thread.most_common()))
print("most frequent leaves counted as other: " + "; ".join(f"{s} ({n})" for s, n in unmatched.most_common(8)))
