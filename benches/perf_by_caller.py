#!/usr/bin/env python3
"""Shares of a `perf record --call-graph dwarf` profile by caller: what docs/performance.md
quotes as "the reservation step 15 %, the userOpHash 2.7 % ..." (perf's own report folds inlined
frames badly for async Rust).

    perf script -i svc.perf > svc.txt
    python3 benches/perf_by_caller.py svc.txt 'sponsor::reserve::reserve::{{closure}}'

For every sample whose stack holds a frame containing ANCHOR, the frame just below its outermost
such frame (toward the leaf) is counted; the output is each such frame's share of all samples,
and the anchor's own share. DEPTH (third argument, default 1) looks further down.

    python3 benches/perf_by_caller.py svc.txt __GI___writev --leaves

counts instead the leaf (where the time was spent) of every sample under ANCHOR, as a share of
those samples: what the response's `writev` spends its time on.

    perf report -i svc.perf --no-children --sort symbol --stdio -g none > self.txt
    python3 benches/perf_by_caller.py self.txt --crates

sums that report's self time by where each symbol is (k256 and its hashing, keccak, the
kernel, allocation and copying, serde_json, hyper and axum, tokio, redis-rs, ours): the
profile's shares in docs/performance.md.
"""
import collections, re, sys


def samples(path):
    """Stacks of `perf script` output, leaf first."""
    stack = []
    for line in open(path, errors='replace'):
        line = line.rstrip('\n')
        if not line.strip():
            if stack:
                yield stack
                stack = []
        elif line[0] in ' \t':
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                stack.append(re.sub(r'\+0x[0-9a-f]+$', '', parts[1].rsplit(' (', 1)[0]))
    if stack:
        yield stack


# Symbols by where they are, first match wins (perf report marks the kernel's `[k]`).
CRATES = [
    ('k256 and its nonce (F)', r'k256|elliptic|crypto_bigint|subtle|ecdsa|rfc6979|hmac|sha2'),
    ('keccak', r'Keccak|keccak'),
    ('kernel', r'\[k\]'),
    ('allocation and copying', r'mi_|malloc|free|memmove|memcpy|memset|alloc::'),
    ('serde_json', r'serde'),
    ('hyper and axum', r'hyper|http|axum|tower'),
    ('tokio', r'tokio|mio'),
    ('redis-rs', r'redis'),
    ('ours', r'session_paymaster'),
    ('alloy', r'alloy|ruint'),
    ('fmt', r'fmt'),
]


def crates(path):
    by = collections.Counter()
    for line in open(path, errors='replace'):
        m = re.match(r'\s*([0-9.]+)%\s+(.*)', line)
        if m:
            share, symbol = float(m.group(1)), m.group(2)
            by[next((name for name, pat in CRATES if re.search(pat, symbol)), 'other')] += share
    for name, share in by.most_common():
        print('%5.1f %% %s' % (share, name))


def leaves(path, anchor):
    total, hits, leaf = 0, 0, collections.Counter()
    for stack in samples(path):
        total += 1
        if any(anchor in frame for frame in stack):
            hits += 1
            leaf[stack[0][:150]] += 1
    print('%d samples, %.1f %% under %s; their leaves:' % (total, 100 * hits / max(total, 1), anchor))
    for frame, n in leaf.most_common(25):
        print('%5.1f %% %s' % (100 * n / max(hits, 1), frame))


def main():
    if sys.argv[2] == '--crates':
        return crates(sys.argv[1])
    path, anchor = sys.argv[1], sys.argv[2]
    if sys.argv[3:] == ['--leaves']:
        return leaves(path, anchor)
    depth = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    total, hits, below = 0, 0, collections.Counter()
    for stack in samples(path):
        total += 1
        at = [i for i, frame in enumerate(stack) if anchor in frame]
        if not at:
            continue
        hits += 1
        i = max(at) - depth
        below[stack[i][:150] if i >= 0 else '(the anchor itself)'] += 1
    print('%d samples, %.1f %% under %s' % (total, 100 * hits / max(total, 1), anchor))
    for frame, n in below.most_common(25):
        print('%5.1f %% %s' % (100 * n / total, frame))


if __name__ == '__main__':
    main()
