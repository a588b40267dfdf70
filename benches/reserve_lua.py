#!/usr/bin/env python3
"""Where redis-server's time per sponsorship goes: reserve.lua inside a bare redis-server.

Starts redis-server on a free port, loads lib.lua + reserve.lua as the service does (a library
of Redis Functions since 0.3, see ledger::redis::library), sends N distinct new operations (a
new sender each, one shared policy counter: the bench's sponsor load) pipelined 100 at a time,
and prints redis-server's microseconds per call and per nested command (INFO commandstats)
and its CPU time per operation, then the same for an empty script given the same arguments.
docs/performance.md ("Redis CPU") quotes it.

    python3 benches/reserve_lua.py [N=50000]
    BATCH=10 python3 benches/reserve_lua.py              # 10 operations a call (see below)
    SESSIONS=2000 BATCH=10 python3 benches/reserve_lua.py  # the session load (see below)
    python3 benches/reserve_lua.py parts [N=20000]
    python3 benches/reserve_lua.py cuts [N=20000]
    python3 benches/reserve_lua.py ab DIR_A DIR_B [N=10000]
    BATCH=8 python3 benches/reserve_lua.py ab DIR_A DIR_B    # 8 operations a call (see below)
    REFUSE=1 BATCH=28 python3 benches/reserve_lua.py ab DIR_A DIR_B  # every one refused
    python3 benches/reserve_lua.py variants [N=10000]
    SESSIONS=2000 BATCH=10 python3 benches/reserve_lua.py commands [N=20000]
    BATCH=10 python3 benches/reserve_lua.py bounds [N=20000]
    python3 benches/reserve_lua.py costs [N=100000]
    COUNT=instructions ROUNDS=1 SESSIONS=20000 BATCH=28 python3 benches/reserve_lua.py ab A B 5000

SESSIONS=G (any mode) sends the bench's session load instead: operation i under session
i % G + 1, its account the sender (a new nonce each), charged to the session's budget too; G
below N makes sessions come round, as grants do in the HTTP bench. Each session's budget is
shared (a grant of version 2, since 0.3.11: a field of its end day's hash, its status beside
it); SESSION_KEYS=1 gives each a key of its own, as grants of version 1 have. (`ab` builds each
checkout's operations with its own copy of this file: one from before SESSIONS sends the
sponsor load whatever it says, and the two sides then run different loads.)
REFUSE=1 (`ab`) has every operation refused for the policy's budget (its limit 1 gwei), each
for a new nonce: what a refusal costs. Both checkouts' `operations` must know REFUSE (this
file's since 0.3.15; a copy can be patched): `ab` stops unless every operation is refused.
COUNT=instructions (any mode that measures redis-server's CPU: the plain run, `cuts`, `ab`,
`variants`, `commands`, `bounds`) runs redis-server under valgrind's callgrind and counts the
instructions it runs instead of its CPU time (thousands an operation where the others say
us; the µs of calls and commands it prints are then callgrind's, fifty times slower; `costs`
counts each piece's instructions; `parts` times inside Redis and is not for it). The same from run to run within half a
percent, where on a shared machine CPU time moves by 15 % a round: what resolves a change of
a few percent in the Lua (ROUNDS=1 is enough; cache misses it does not count). redis-server
runs with `--hz 1` and no active rehashing, so that its timers' work, more the slower a
script runs under callgrind, counts for little. Needs valgrind (Debian package).
`parts` prices the pieces instead (what docs/performance.md quotes): scripts given the sponsor
load's arguments (or none) that only run a piece, each median of 4 interleaved rounds, with
EVALSHA (lib.lua's helpers made on every call; a function's are made once).
`cuts` runs reserve.lua itself cut short after each of its steps (a return there), on the
same operations, each median of 3 interleaved rounds (ROUNDS=k for more): what each step adds
to redis-server's CPU time (as a function, as the service runs it; BATCH=10 for ten operations
a call).
`ab` times the reserve.lua of two checkouts (e.g. a `git worktree` of another commit), each
with its own copy of this file's `operations` (a change may change the arguments), in turn in
one redis-server, 9 rounds, the order swapped every round; where two cores are allowed,
redis-server is pinned to one and this driver to another (ROUNDS=21 in the environment for
more rounds). One round moves by about 15 %, and the same script against itself has given
medians 13 % apart: smaller differences in the medians are noise.
It also prints redis-server's CPU time per operation (/proc/<pid>/schedstat) and the ratio of
the two checkouts' in each round (both ran in it, one after the other, so what drifts between
rounds cancels), which resolves differences of a few percent. A checkout whose ledger is a
library of Redis Functions runs as one (FCALL), an earlier one with EVALSHA. With BATCH=k, a
checkout whose reserve.lua takes several operations a call (its operations() file has
batched()) gets k to a call, as the service's ledger sends what waited for a policy's call in
flight; the other one each alone.
`commands` runs, on the same calls, reserve.lua against a script that runs the commands a new
operation under a session runs in the common case, one after the other with nothing between
(what the script would cost with no logic of its own), and against an empty script: medians
of ROUNDS rounds (3 unless given), redis-server's CPU time per operation. It sends the session
load (SESSIONS=2000 unless given).
`bounds` runs `ab` of this checkout's reserve.lua against itself with commands skipped (the
session's status read: its fields in the shared hash's `HMGET`, or its state key's `HGET`;
then it, the senders' and the policy's `HSET`s and the `APPEND`):
wrong scripts, a bound on what sparing those commands could give; then against itself given
random ids instead of the bench's zero-padded ones. Under SESSIONS=2000 unless given.
`costs` prices single pieces of what reserve.lua does, each run N times in a loop inside one
script (redis-server's clock around the loop, median of 3, less an empty loop's): a command
called from Lua (its arguments made Redis strings, its reply made Lua values), `struct.unpack`
of one scope's arguments, a table of one scope's thirteen slots, a `pcall`. What a step of
`cuts` adds, divided by these, says how many such pieces it is worth.
`variants` does the same with this checkout against itself, run two ways: its scripts with
EVALSHA (lib.lua's helpers made on every call) against FCALL as the service runs them; then
senders' 0.2 keys not read against read (missing, as on a Redis 0.2 served in a window it
left no key in).
"""
import hashlib, os, shutil, socket, statistics, struct, subprocess, sys, tempfile, time

MODES = ('parts', 'cuts', 'ab', 'variants', 'commands', 'bounds', 'costs')
MODE = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in MODES else None
ARGS = sys.argv[2:] if MODE else sys.argv[1:]
AB_DIRS = ARGS[:2] if MODE == 'ab' else []
if MODE == 'ab':
    if len(AB_DIRS) != 2:
        sys.exit('usage: reserve_lua.py ab DIR_A DIR_B [N]')
    ARGS = ARGS[2:]
N = int(ARGS[0]) if ARGS else {None: 50000, 'parts': 20000, 'cuts': 20000, 'ab': 10000,
                               'variants': 10000, 'commands': 20000, 'bounds': 20000,
                               'costs': 100000}[MODE]
# Rounds: `ab`'s (each runs both checkouts; ROUNDS=21 in the environment for finer ratios),
# `cuts`' (3 unless given).
ROUNDS = int(os.environ.get('ROUNDS', '9'))
CUT_ROUNDS = int(os.environ.get('ROUNDS', '3'))
# Operations a call, for a checkout whose reserve.lua takes several (BATCH=8): `ab`, `cuts`
# and the plain run.
BATCH = int(os.environ.get('BATCH', '1'))
# REFUSE=1 (`ab`): every operation refused for the policy's budget (its limit 1 gwei), each a
# new nonce: what a refusal costs (since 0.3.15 it writes the new key and deletes it).
REFUSE = bool(os.environ.get('REFUSE'))
# COUNT=instructions: redis-server's instructions (callgrind), not its CPU time.
INSTRUCTIONS = os.environ.get('COUNT') == 'instructions'
COST = 'k instructions of redis-server' if INSTRUCTIONS else 'us of redis-server CPU'
LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src', 'ledger')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, port, tries=100):
        for _ in range(tries):
            try:
                self.sock = socket.create_connection(('127.0.0.1', port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit('redis-server did not answer on port %d' % port)
        self.f = self.sock.makefile('rb')

    @staticmethod
    def enc(*args):
        out = [b'*%d\r\n' % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b'$%d\r\n%s\r\n' % (len(a), a))
        return b''.join(out)

    def read(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b'-':
            raise RuntimeError(rest.decode())
        if kind in b'+:':
            return rest
        if kind == b'$':
            return None if int(rest) < 0 else self.f.read(int(rest) + 2)[:-2]
        return [self.read() for _ in range(int(rest))]

    def call(self, *args):
        self.sock.sendall(self.enc(*args))
        return self.read()

    def pipelined(self, commands):
        """Sends the commands 100 at a time; returns how many did not answer {0} (reserved)."""
        refused = 0
        for i in range(0, len(commands), 100):
            batch = commands[i:i + 100]
            self.sock.sendall(b''.join(self.enc(*c) for c in batch))
            for _ in batch:
                reply = self.read()
                # A call of several operations answers a reply each (since reserve.lua takes
                # them in batches), one before.
                replies = reply if reply and isinstance(reply[0], list) else [reply]
                refused += sum(r != [b'0'] for r in replies)
        return refused


def short(b):
    return bytes([len(b)]) + b


def operations(sha, n, old_keys=False, random_ids=False):
    """The arguments ledger::redis::reserve sends for a new operation of a new sender (with
    `old_keys`, where it has reserve.lua read the sender's 0.2 key too). With SESSIONS=G in the
    environment, the bench's session load instead: operation i under session i % G + 1 (its
    account the sender, a new nonce each), charged to the session's budget too."""
    sessions = int(os.environ.get('SESSIONS', '0'))
    refuse = bool(os.environ.get('REFUSE'))
    now = int(time.time())
    valid_until, valid_after = now + 600, now - 60
    sig = bytes(range(65))
    out = []
    for i in range(n):
        op_id = struct.pack('>Q', i) + b'\x01' * 12
        landing = struct.pack('>Q', i) + b'\x02' * 12
        nonce = b'sp:{bench}:n:' + landing
        account = i % sessions + 1 if sessions else i + 1
        raw_sender = struct.pack('>Q', account).rjust(20, b'\x00')
        if random_ids:
            raw_sender = hashlib.sha256(b'a%d' % account).digest()[:20]
        sender = b'\x01' + raw_sender  # pack_name of 0x<40 hex>
        # Each scope's name in records (ledger::redis::record_name: `s:0x…` a sender's), packed.
        scopes = [(b's:0x' + raw_sender.hex().encode() + b':20789', b's:' + sender + b':20789'),
                  (b'policy:692', b'policy:692')]
        # Where each counter lives (ledger::redis::counter_slot): the sender's is its field in
        # the window's hash (a window begun after the layout's first start: the key it had
        # before 0.3 is not read), the policy's its own.
        # (Each slot's last value its kind byte: 1 for a sender whose 0.2 key is read too, 2 for
        # a session's shared budget whose hash holds its status.)
        slots = [(b'sp:{bench}:budget:sender:20789', raw_sender, scopes[0][0],
                  int(old_keys)),
                 (b'sp:{bench}:budget:policy:692', b'c', scopes[1][0], 0)]
        tail = b'\x00'
        state = nonce
        if sessions:
            raw_session = struct.pack('>Q', account).rjust(32, b'\x00')
            if random_ids:
                raw_session = hashlib.sha256(b's%d' % account).digest()
            if os.environ.get('SESSION_KEYS'):
                # A grant of version 1 (before 0.3.11): its budget a key of its own, named in a
                # record that gives its session's id by one byte.
                name = b'session:0x' + raw_session.hex().encode()
                scopes.insert(0, (name, b'\x03'))
                slots.insert(0, (b'sp:{bench}:budget:' + name, b'c', name, 0))
            else:
                # Version 2 (ledger::redis::counter_slot): a field of its end day's hash, the
                # first 20 bytes of its id's keccak-256 (sha3's here: any 20 bytes cost the
                # same), its status beside it, its name in records a sender's form.
                field = hashlib.sha3_256(raw_session).digest()[:20]
                name = b's:0x' + field.hex().encode() + b':d20790'
                scopes.insert(0, (name, b's:\x01' + field + b':d20790'))
                slots.insert(0, (b'sp:{bench}:budget:sender:d20790', field, name, 2))
            state = b'sp:{bench}:session:0x' + raw_session.hex().encode()
            # A session's record: its id (which names its state key), no token amounts.
            tail = b'\x02' + raw_session + b'\x00'
        record = (b'\x00' + struct.pack('>Q', 780000) + struct.pack('>Q', valid_until)[2:]
                  + struct.pack('>I', valid_until - valid_after) + sig + b'\x01' + op_id[:8]
                  + bytes([len(scopes)]) + b''.join(short(packed) for _, packed in scopes) + tail)
        bucket = valid_until // 10
        keys = [nonce, b'sp:{bench}:x', b'sp:{bench}:x:%d' % bucket, state]
        keys += [key for key, _, _, _ in slots]
        # reserve.lua's NUMBERS: check_only, cost, nonce TTL, window, refresh bound, session,
        # session TTL, most open under a session, bucket, bucket TTL, trim and expiry bounds,
        # most open per nonce.
        numbers = struct.pack('>14Q', 0, 780000, 4200, valid_until, valid_after, now + 30,
                              int(bool(sessions)), 86400, 4, bucket, 4209, (now - 3600) // 10, now - 3600, 16)
        # (REFUSE=1: the policy's cost limit 1 gwei, so every operation is refused there.)
        limits = b''.join(struct.pack('>3Q', 1 if refuse and field == b'c' else 10**15, 10**6,
                                      62399) + short(field) + short(name)
                          + bytes([kind]) for _, field, name, kind in slots)
        entry = short(op_id) + struct.pack('>H', len(record)) + record
        args = [numbers, entry, limits]
        # One operation a call, framed: its count of keys and of arguments.
        out.append(['EVALSHA', sha, len(keys)] + keys + [bytes([len(keys), len(args)])] + args)
    return out


def batched(commands, k):
    """operations()' calls, k operations to a call (as the service's ledger sends several
    reservations of one policy together)."""
    out = []
    for i in range(0, len(commands), k):
        keys, frame, args = [], b'', []
        for c in commands[i:i + k]:
            n = int(c[2])
            keys += c[3:3 + n]
            frame += c[3 + n]
            args += c[4 + n:]
        out.append(commands[i][:2] + [len(keys)] + keys + [frame] + args)
    return out


def uses_functions(root):
    """Whether the checkout at `root` runs its ledger scripts as Redis Functions (0.3 on)."""
    path = os.path.join(root, 'src', 'ledger', 'redis.rs')
    return os.path.isfile(path) and 'register_function' in open(path).read()


def load(r, lib, reserve, function):
    """Loads lib.lua + reserve.lua as a checkout's service runs them: as a function of a library
    (as ledger::redis::library builds it) or as a script. Returns the command's first two words,
    to put in place of operations()' `EVALSHA sha`."""
    if function:
        r.call('FUNCTION', 'LOAD', 'REPLACE', b'#!lua name=sp_bench\n' + lib
               + b"\nredis.register_function('sp_bench_reserve', function(KEYS, ARGV)\n"
               + reserve + b'\nend)\n')
        return ['FCALL', 'sp_bench_reserve']
    return ['EVALSHA', r.call('SCRIPT', 'LOAD', lib + reserve)]


def commandstats(r):
    stats = {}
    for line in r.call('INFO', 'commandstats').decode().split('\r\n'):
        if line.startswith('cmdstat_'):
            name, fields = line[8:].split(':', 1)
            f = dict(kv.split('=') for kv in fields.split(','))
            stats[name] = (int(f['calls']), float(f['usec_per_call']))
    return stats


# Scripts that run one piece of reserve.lua's work on the sponsor load's keys and arguments.
FMT = "string.format('%d', 123456 + i)"
PIECES = [
    ('an empty script, no arguments', b'return {0}', False),
    ('an empty script, the 4 arguments', b'return {0}', True),
    ('9 redis.call GET of a missing key', b"for i = 1, 9 do redis.call('GET', KEYS[1]) end return {0}", True),
    ('8 string.format %d', ("local s for i = 1, 8 do s = %s end return {0}" % FMT).encode(), True),
    ('8 tonumber of a decimal', b"local s for i = 1, 8 do s = tonumber('1000000000000000') end return {0}", True),
    ('HSET of an existing key', b"redis.call('HSET', KEYS[6], 'c', struct.pack('>i8i8i8', 1, 1, 1)) return {0}", True),
    ('HSET creating a key', b"redis.call('HSET', KEYS[1], 'c', struct.pack('>i8i8i8', 1, 1, 1)) return {0}", True),
    ('SET EX creating a key', b"redis.call('SET', KEYS[1], ARGV[3], 'EX', 1000) return {0}", True),
    ('3 tables of 12 named fields', b"local t for i = 1, 3 do t = {a = 1, b = 2, c = 3, d = 4, "
     b"e = 5, f = 6, g = 7, h = 8, i = 9, j = 10, k = 11, l = 12} end return {0}", True),
    ('3 lists of 12 values', b"local t for i = 1, 3 do t = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12} "
     b"end return {0}", True),
]


def parts(r):
    ops = operations(r.call('SCRIPT', 'LOAD', b'return {0}'), N)
    results = {}
    for _ in range(4):
        for label, body, with_args in PIECES:
            sha = r.call('SCRIPT', 'LOAD', body)
            # The policy counter (KEYS[6]) exists, as in the sponsor load; the rest is new (but
            # the senders' window hash, KEYS[5], after the first operation).
            r.call('FLUSHALL')
            r.call('HSET', ops[0][3 + 5], 'c', struct.pack('>3q', 0, 0, 0))
            r.call('CONFIG', 'RESETSTAT')
            r.pipelined([['EVALSHA', sha] + op[2:] if with_args else ['EVALSHA', sha, 0] for op in ops])
            results.setdefault(label, []).append(commandstats(r)['evalsha'][1])
    for label, runs in results.items():
        print('%-36s %6.2f us per EVALSHA (median of %s)' % (label, statistics.median(runs), runs))


# reserve.lua cut after these steps (the text before each marker runs, then `return {0}`: a
# reserved operation's reply, so the new record a cut after its `SET … NX GET` wrote stays).
CUTS = [
    ('frame read, scopes parsed, shared senders read (HMGET)', '  local check_only, cost, nonce_ttl'),
    ('its numbers unpacked', "  -- The nonce's key. Where it has none"),
    ("the nonce's key written or read (SET NX GET)", 'local mine, rec = nil, nil'),
    ('the session status and a repeat checked', 'local session_key = session and keys[4] or nil'),
    ('open reservations counted', "-- Each scope's counter, as an operation"),
    ('counters read and checked (HMGET, unpack)', 'local totals = #args > 3'),
    ('counters written (HSET, TIME, EXPIRE of a new one)', 'if session and #totals > 0 then'),
    ('the record listed (APPEND): the whole script', None),
]


def cuts(r, pid):
    lib = open(os.path.join(LUA, 'lib.lua'), 'rb').read()
    script = open(os.path.join(LUA, 'reserve.lua'), 'rb').read()
    results = {}
    for _ in range(CUT_ROUNDS):
        for label, marker in CUTS:
            marker = marker and marker.encode()
            body = (script if marker is None else
                    # (Each marker is inside the function that runs one operation: it
                    # returns there, and the rest stays, so that the function still closes.)
                    script[:script.index(marker)] + b'do return {0} end\n'
                    + script[script.index(marker):])
            results.setdefault(label, []).append(cpu_per_operation(r, pid, lib, body))
    print_medians(results, 52)


def cpu_per_operation(r, pid, lib, body):
    """redis-server's CPU time per operation (us) for N new operations in a flushed keyspace,
    `body` run as the service runs reserve.lua: a function of a library after lib.lua, BATCH
    operations a call."""
    head = load(r, lib, body, True)
    r.call('FLUSHALL')
    ops = operations('unused', N)
    if BATCH > 1:
        ops = batched(ops, BATCH)
    before = cpu_ns(pid)
    r.pipelined([head + op[2:] for op in ops])
    return round((cpu_ns(pid) - before) / 1000 / N, 2)


def print_medians(results, width):
    for label, runs in results.items():
        print(('%-*s %6.2f ' + COST + ' per operation (median of %s)')
              % (width, label, statistics.median(runs), runs))


def ab_versions():
    """Each checkout's (label, operations, lib.lua + reserve.lua), or exits saying what is missing."""
    import importlib.util
    sys.dont_write_bytecode = True  # no __pycache__ left in the checkouts
    versions = []
    for i, d in enumerate(AB_DIRS):
        paths = [os.path.join(d, *p) for p in (('benches', 'reserve_lua.py'),
                                               ('src', 'ledger', 'lib.lua'),
                                               ('src', 'ledger', 'reserve.lua'))]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            sys.exit('ab: %s has no %s' % (d, ', '.join(missing)))
        spec = importlib.util.spec_from_file_location('reserve_lua_%d' % i, paths[0])
        module = importlib.util.module_from_spec(spec)
        argv, sys.argv = sys.argv, sys.argv[:1]  # older copies read their arguments when loaded
        try:
            spec.loader.exec_module(module)
        finally:
            sys.argv = argv
        if not hasattr(module, 'operations'):
            sys.exit('ab: %s has no operations() to build arguments with' % paths[0])
        lib, reserve = (open(p, 'rb').read() for p in paths[1:])
        operations = module.operations
        if BATCH > 1 and hasattr(module, 'batched'):
            operations = (lambda ops, batched: lambda sha, n: batched(ops(sha, n), BATCH))(
                module.operations, module.batched)
        versions.append(('%s (%s)' % ('AB'[i], d), operations, lib, reserve, uses_functions(d)))
    return versions


# Under COUNT=instructions: the instructions counted so far, and the directory callgrind dumps
# its counts to (main sets it).
counted = {'total': 0, 'dir': None}


def callgrind_control(*args):
    """`callgrind_control ARGS`, or exits saying what failed."""
    done = subprocess.run(['callgrind_control', *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    if done.returncode != 0:
        sys.exit('callgrind_control %s failed: %s' % (' '.join(args), done.stderr.decode()))


def instructions(pid):
    """The instructions redis-server (under callgrind, COUNT=instructions) has run since its
    counting was turned on: what it counted since the last dump, dumped now, added to what the
    dumps before counted. (A dump's `totals:` line ends it: read once it is there.)"""
    done = set(os.listdir(counted['dir']))
    callgrind_control('-d', str(pid))
    for _ in range(600):
        for name in sorted(set(os.listdir(counted['dir'])) - done):
            if name.startswith('cg.out'):
                with open(os.path.join(counted['dir'], name)) as f:
                    for line in f:
                        if line.startswith('totals:'):
                            counted['total'] += int(line.split()[1])
                            return counted['total']
        time.sleep(0.1)
    sys.exit('callgrind wrote no whole dump of redis-server in 60 s')


def cpu_ns(pid):
    """Nanoseconds the process's main thread has run on a CPU (/proc/<pid>/schedstat's first
    field), or, on a kernel without schedstats, the whole process's user and system time
    (/proc/<pid>/stat, in clock ticks); under COUNT=instructions, its instructions."""
    if INSTRUCTIONS:
        return instructions(pid)
    try:
        with open('/proc/%d/schedstat' % pid) as f:
            return int(f.read().split()[0])
    except OSError:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf('SC_CLK_TCK')


def ab(r, versions, pid, rounds=ROUNDS):
    results, cpu = {}, {}
    for round_ in range(rounds):
        # The order swapped every round: what runs first in a fresh keyspace gains nothing.
        for label, operations, lib, reserve, function in (versions if round_ % 2 == 0
                                                          else versions[::-1]):
            head = load(r, lib, reserve, function)
            r.call('FLUSHALL')
            ops = [head + op[2:] for op in operations('unused', N)]
            r.call('CONFIG', 'RESETSTAT')
            before = cpu_ns(pid)
            refused = r.pipelined(ops)
            used = cpu_ns(pid) - before
            if refused != (N if REFUSE else 0):
                sys.exit('%s: %d operations of %d not reserved' % (label, refused, N))
            results.setdefault(label, []).append(commandstats(r)[head[0].lower()][1])
            cpu.setdefault(label, []).append(round(used / 1000 / N, 2))
    for label, runs in results.items():
        print('%-40s %6.2f us per call (median of %s)' % (label, statistics.median(runs), runs))
        print(('%-40s %6.2f ' + COST + ' per operation (median of %s)')
              % ('', statistics.median(cpu[label]), cpu[label]))
    # Each round ran both, one after the other: their ratio cancels what drifts between rounds.
    (a, ca), (b, cb) = cpu.items()
    ratios = sorted(y / x for x, y in zip(ca, cb))
    print(('B / A, redis-server ' + ('instructions' if INSTRUCTIONS else 'CPU') + ', paired by round: median %.3f (middle half %.3f-%.3f)')
          % (statistics.median(ratios), ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]))


def variants(r, pid):
    """`ab` of this checkout against itself, run two ways (see the module's text)."""
    import functools
    lib = open(os.path.join(LUA, 'lib.lua'), 'rb').read()
    reserve = open(os.path.join(LUA, 'reserve.lua'), 'rb').read()
    print('A: EVALSHA, B: FCALL')
    ab(r, [('A (EVALSHA)', operations, lib, reserve, False),
           ('B (FCALL)', operations, lib, reserve, True)], pid)
    print('A: 0.2 keys not read, B: read (FCALL)')
    ab(r, [('A (not read)', operations, lib, reserve, True),
           ('B (read)', functools.partial(operations, old_keys=True), lib, reserve, True)], pid)


# The commands a new operation of an existing session runs in the common case (an existing
# sender and policy counter, a new nonce, a bucket that exists), one after the other with no
# logic: reserve.lua's floor. The session's budget shared (version 2: its status read with its
# counter); under SESSION_KEYS=1 reserve.lua also runs the status `HGET` this leaves out. Each
# operation as a call of its own would run them: at BATCH=k it reads its two hashes itself,
# where reserve.lua reads a call's fields of each hash in one `HMGET`, and it leaves out what
# a call runs once (`TIME`, the policy counter's `HMGET`); and it writes each counter with an
# `HSET` of its own, where since 0.3.17 reserve.lua writes a call's fields of each hash in one
# (at BATCH=k, no longer a floor of reserve.lua's commands).
COMMANDS_ONLY = b"""
local frame = ARGV[1]
local k, a = 1, 2
for at = 1, #frame - 1, 2 do
  local key_count, arg_count = string.byte(frame, at, at + 1)
  redis.call('SET', KEYS[k], ARGV[a + 1], 'NX', 'GET', 'EX', 4200)
  redis.call('HMGET', KEYS[k + 4], 'until', 'abcdefghijabcdefghij', 'abcdefghijabcdefghijr')
  redis.call('HMGET', KEYS[k + 5], 'until', 'abcdefghijabcdefghij')
  redis.call('HSET', KEYS[k + 4], 'abcdefghijabcdefghij', 'abcdefghabcdefghabcdefgh')
  redis.call('HSET', KEYS[k + 5], 'abcdefghijabcdefghij', 'abcdefghabcdefghabcdefgh')
  redis.call('HSET', KEYS[k + 6], 'c', 'abcdefghabcdefghabcdefgh')
  redis.call('APPEND', KEYS[k + 2], 'abcdefghijabcdefghij')
  k, a = k + key_count, a + arg_count
end
return {}
"""


# `bounds`: reserve.lua edited so that it skips commands (wrong, a bound on what sparing them
# could give), each edit (file, text, replacement) as applied to this checkout.
NO_STATUS = [
    # A shared budget's status: not read with the counters, nor checked.
    ('lib.lua', b"        if s[S_STATUS] then\n          f[#f + 1] = s[S_STATUS]\n        end\n", b""),
    ('reserve.lua', b"  if status_at then\n", b"  if false then\n"),
    # A session's state key's (SESSION_KEYS=1, or a session without a budget).
    ('reserve.lua', b"  elseif session and redis.call('HGET', keys[4], 'status') == 'revoked' then",
     b"  elseif false then"),
]
BOUNDS = [
    ("the session's status read skipped", NO_STATUS),
    ("the status read, the senders' and policy's HSETs and the APPEND skipped", NO_STATUS + [
        # (A call of one operation writes as it charges, one of several holds its writes.)
        ('reserve.lua', b"        redis.call('HSET', keys[i], s[S_FIELD], packed)\n",
         b"        if session and i == 5 then redis.call('HSET', keys[i], s[S_FIELD], packed) end\n"),
        ('reserve.lua', b"      if not w then\n        w = {}\n        writes[keys[i]] = w\n",
         b"      if not (session and i == 5) then\n        w = {}\n      elseif not w then\n"
         b"        w = {}\n        writes[keys[i]] = w\n"),
        ('lib.lua', b"if not listed and redis.call('APPEND', keys[3], string.sub(keys[1], -20)) == 20",
         b"if not listed and false"),
    ]),
]


def bounds(r, pid):
    """This checkout's reserve.lua against itself edited (BOUNDS), then against itself given
    random ids instead of zero-padded ones, `ab` each, under SESSIONS=2000 unless given."""
    import functools
    os.environ.setdefault('SESSIONS', '2000')
    sources = {f: open(os.path.join(LUA, f), 'rb').read() for f in ('lib.lua', 'reserve.lua')}
    ops = operations if BATCH == 1 else (lambda sha, n: batched(operations(sha, n), BATCH))
    for label, edits in BOUNDS:
        edited = dict(sources)
        for f, old, new in edits:
            if edited[f].count(old) != 1:
                sys.exit('bounds: %s no longer holds %r' % (f, old))
            edited[f] = edited[f].replace(old, new)
        print('A: reserve.lua, B: %s' % label)
        ab(r, [('A', ops, sources['lib.lua'], sources['reserve.lua'], True),
               ('B', ops, edited['lib.lua'], edited['reserve.lua'], True)], pid)
    random = functools.partial(operations, random_ids=True)
    print('A: the bench\'s ids, B: random ones')
    ab(r, [('A', ops, sources['lib.lua'], sources['reserve.lua'], True),
           ('B', random if BATCH == 1 else (lambda sha, n: batched(random(sha, n), BATCH)),
            sources['lib.lua'], sources['reserve.lua'], True)], pid)


def commands_alone(r, pid):
    os.environ.setdefault('SESSIONS', '2000')
    lib = open(os.path.join(LUA, 'lib.lua'), 'rb').read()
    reserve = open(os.path.join(LUA, 'reserve.lua'), 'rb').read()
    results = {}
    for _ in range(int(os.environ.get('ROUNDS', '3'))):
        for label, body in (('reserve.lua', reserve), ('its commands alone', COMMANDS_ONLY),
                            ('an empty script, same arguments', b'return {}')):
            results.setdefault(label, []).append(cpu_per_operation(r, pid, lib, body))
    print_medians(results, 34)


# `costs`: (label, Lua run N times in a loop; `key` is a session budget's key holding a packed
# counter, `packed` and `scope` a packed counter and one scope's arguments as reserve.lua gets
# them).
COSTS = [
    ('an empty loop', ''),
    ("redis.call('GET') of a missing key", "local x = redis.call('GET', missing)"),
    ("redis.call('HGET') of a missing field", "local x = redis.call('HGET', key, 'status')"),
    ("redis.call('HMGET') of four fields", "local x = redis.call('HMGET', key, 'until', 'c', 'cost', 'ops')"),
    ("redis.call('HSET') of one field", "redis.call('HSET', key, 'c', packed)"),
    ("redis.call('TIME')", "local x = redis.call('TIME')"),
    ('struct.pack of a counter', "local x = struct.pack('>i8i8i8', i, 2, 3)"),
    ("struct.unpack of a scope's arguments", "local a, b, c, d, e, f, g = struct.unpack(SCOPE_FORMAT, scope, 1)"),
    ("a scope's table of thirteen slots", "local x = {1, 2, 3, 'a', 'b', false, false, false, 0, 0, 0, 0, false}"),
    ('a pcall of a function', 'local ok, x = pcall(f, 1, 2)'),
    ("string.format('%d')", "local x = string.format('%d', i)"),
    ('an empty table', 'local x = {}'),
    ('a table of five values', 'local x = {f, f, f, 1, 2}'),
    ('a table of five named fields', 'local x = {a = f, b = f, c = f, d = 1, e = 2}'),
    ("struct.unpack of three scopes' arguments at once",
     "local a, b, c, d, e, f, g, a2, b2, c2, d2, e2, f2, g2, a3, b3, c3, d3, e3, f3, g3 = "
     "struct.unpack(SCOPE3, scope3, 1)"),
    ('tonumber of a decimal string', "local x = tonumber('1234567890')"),
    ('a call of a C function (math.min)', 'local x = math.min(i, 5)'),
    ("redis.call('HSET') of a new field (a number) into a growing hash",
     "redis.call('HSET', missing, i, packed)"),
]


def costs(r, pid):
    """Each of COSTS, N times in a loop in one script: timed by Redis' clock inside it, median
    of 3, or under COUNT=instructions redis-server's instructions for the whole script, once
    (the same each time); less an empty loop's."""
    results = {}
    for _ in range(1 if INSTRUCTIONS else 3):
        for label, piece in COSTS:
            script = '''
local n = tonumber(ARGV[1])
local SCOPE_FORMAT = '>I8I8I8Bc0Bc0B'
local key = 'sp:{bench}:budget:session:0x' .. string.rep('ab', 32)
local missing = key .. 'n'
local packed = struct.pack('>i8i8i8', 1, 2, 3)
redis.call('HSET', key, 'c', packed, 'until', '1234567890')
local name = 's:0x' .. string.rep('ab', 20)
local scope = struct.pack(SCOPE_FORMAT, 2^53, 1000, 3600, 20, string.rep('a', 20), #name, name, 0)
local scope3 = scope .. scope .. scope
local SCOPE3 = SCOPE_FORMAT .. SCOPE_FORMAT:sub(2) .. SCOPE_FORMAT:sub(2)
local f = function(a, b) return a end
redis.call('DEL', missing)
local t0 = redis.call('TIME')
for i = 1, n do
  %s
end
local t1 = redis.call('TIME')
return tostring(((t1[1] - t0[1]) * 1e6 + (t1[2] - t0[2])) / n * 1000)
''' % piece
            before = cpu_ns(pid) if INSTRUCTIONS else 0
            took = float(r.call('EVAL', script, 0, N))
            if INSTRUCTIONS:
                took = (cpu_ns(pid) - before) / N
            results.setdefault(label, []).append(took)
    unit = 'instructions' if INSTRUCTIONS else 'ns'
    empty = statistics.median(results.pop('an empty loop'))
    print('each piece, beyond an empty loop (%.0f %s an iteration):' % (empty, unit))
    for label, runs in results.items():
        print('%-40s %7.0f %s (median of %s)' % (label, statistics.median(runs) - empty, unit,
                                                 [round(x - empty) for x in runs]))


def main():
    port = free_port()
    versions = ab_versions() if MODE == 'ab' else None
    pinned = MODE in ('ab', 'variants', 'bounds')
    # `ab` pins redis-server and this driver to a core each, where two are allowed and taskset is.
    cores = sorted(os.sched_getaffinity(0))
    pin = pinned and len(cores) >= 2 and shutil.which('taskset') is not None
    if pin:
        os.sched_setaffinity(0, {cores[0]})
    if pinned:
        print('redis-server on core %d, this driver on core %d' % (cores[1], cores[0]) if pin
              else 'not pinned (one core allowed, or no taskset)')
    with tempfile.TemporaryDirectory() as d:
        counted['dir'] = d
        if INSTRUCTIONS:
            missing = [c for c in ('valgrind', 'callgrind_control') if not shutil.which(c)]
            if missing:
                sys.exit('COUNT=instructions needs %s (Debian package valgrind)'
                         % ' and '.join(missing))
        server = subprocess.Popen((['taskset', '-c', str(cores[1])] if pin else [])
                                  + (['valgrind', '--tool=callgrind', '--instr-atstart=no',
                                      '--callgrind-out-file=' + os.path.join(d, 'cg.out')]
                                     if INSTRUCTIONS else [])
                                  + ['redis-server', '--port', str(port), '--save', '',
                                     '--appendonly', 'no', '--dir', d]
                                  # (Counting instructions: little of redis-server's timers'
                                  # work, which under callgrind does more the slower a script
                                  # runs.)
                                  + (['--hz', '1', '--activerehashing', 'no']
                                     if INSTRUCTIONS else []),
                                  stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(d, 'valgrind.log'), 'wb')
                                  if INSTRUCTIONS else None)
        try:
            r = Redis(port, tries=600 if INSTRUCTIONS else 100)
            if INSTRUCTIONS:
                callgrind_control('--instr=on', str(server.pid))
            if MODE == 'parts':
                return parts(r)
            if MODE == 'cuts':
                return cuts(r, server.pid)
            if MODE == 'ab':
                return ab(r, versions, server.pid)
            if MODE == 'variants':
                return variants(r, server.pid)
            if MODE == 'commands':
                return commands_alone(r, server.pid)
            if MODE == 'bounds':
                return bounds(r, server.pid)
            if MODE == 'costs':
                return costs(r, server.pid)
            lib = open(os.path.join(LUA, 'lib.lua'), 'rb').read()
            reserve = open(os.path.join(LUA, 'reserve.lua'), 'rb').read()
            for label, head_lib, body, function in (
                    ('reserve.lua', lib, reserve, uses_functions(os.path.join(LUA, '..', '..'))),
                    ('an empty script, same arguments', b'', b'return {0}', False),
                    ('lib.lua alone, same arguments', lib, b'return {0}', False)):
                r.call('FLUSHALL')
                head = load(r, head_lib, body, function)
                ops = operations('unused', N)
                if BATCH > 1:
                    ops = batched(ops, BATCH)
                r.call('CONFIG', 'RESETSTAT')
                before = cpu_ns(server.pid)
                refused = r.pipelined([head + op[2:] for op in ops])
                used = cpu_ns(server.pid) - before
                if refused:
                    sys.exit('%s: %d operations not reserved' % (label, refused))
                stats = commandstats(r)
                kind = head[0].lower()
                print(('%-34s %6.2f us per %s (%d calls), %.2f ' + COST + ' per operation')
                      % (label, stats[kind][1], head[0], stats[kind][0], used / 1000 / N))
                for name, (calls, us) in sorted(stats.items()):
                    if name not in (kind, 'config|resetstat', 'script|load', 'function|load',
                                    'flushall', 'info'):
                        print('    %-18s %6.2f us x %.2f per operation' % (name, us, calls / N))
        finally:
            server.terminate()
            server.wait()


if __name__ == '__main__':
    main()
