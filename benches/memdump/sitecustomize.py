"""A memory report from a running server, for diagnosis only (``benches/soak.py --memory-dump``).

Put this directory on the server's ``PYTHONPATH`` and set ``ANYTLS_DEBUG_MEMORY=PREFIX``: each
SIGUSR2 then writes ``PREFIX-<n>.txt`` (then an empty ``PREFIX-<n>.done``) with, as found and
after a full ``gc.collect()`` and glibc's ``malloc_trim(0)``: the collector's counts, the
allocated blocks, VmRSS/RssAnon/RssFile and pymalloc's arena figures
(``sys._debugmallocstats``, not available under tracemalloc); between the two, what the
collection found (``gc.DEBUG_SAVEALL``) by type, and one reference cycle per type of interest.
Nothing here is part of the package; without the variable, it does nothing.
"""

import os
import signal

_PATH = os.environ.get("ANYTLS_DEBUG_MEMORY")
_CYCLE_TYPES = (
    "SessionProtocol",
    "SessionContext",
    "ServerSession",
    "BulkTLSProtocol",
    "Server",
    "Client",
    "Connector",
    "TCPStream",
    "Deferred",
    "_OriginFactory",
)


def _pymalloc(f):
    import sys
    import tempfile

    fd, name = tempfile.mkstemp()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(fd, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    with open(name) as s:
        for line in s:
            if line.startswith("#") or "unused pools" in line or "arenas *" in line:
                f.write("  " + line)
    os.unlink(name)


def _state(f, label):
    import gc
    import sys

    f.write(f"--- {label}\n")
    f.write(f"gc counts {gc.get_count()} stats {gc.get_stats()} frozen {gc.get_freeze_count()}\n")
    f.write(f"allocated blocks {sys.getallocatedblocks()}\n")
    with open("/proc/self/status") as s:
        f.write("".join(line for line in s if line.startswith(("VmRSS", "RssAnon", "RssFile"))))
    _pymalloc(f)


def _how(a, b):
    """How ``a`` refers to ``b``, as far as cheaply known."""
    if isinstance(a, dict):
        for k, v in a.items():
            if v is b:
                return f"[{k!r}]"[:40]
        return "[key]"
    d = getattr(a, "__dict__", None)
    if d is not None:
        for k, v in d.items():
            if v is b:
                return "." + k
        if d is b:
            return ".__dict__"
    for k in ("__self__", "__func__", "__closure__", "cell_contents"):
        try:
            if getattr(a, k) is b:
                return "." + k
        except Exception:
            pass
    return "[i]" if isinstance(a, (list, tuple)) else "->"


def _cycles(f, garbage):
    """For the first garbage object of each type in _CYCLE_TYPES, the shortest cycle back to
    it through garbage objects (breadth first), or "none" if it only hangs off one."""
    import gc
    from collections import deque

    ids = {id(o) for o in garbage}
    seen = set()
    for start in garbage:
        name = type(start).__qualname__
        if name in seen or name not in _CYCLE_TYPES:
            continue
        seen.add(name)
        prev = {id(start): None}
        queue = deque([start])
        found = None
        while queue and found is None:
            o = queue.popleft()
            for r in gc.get_referents(o):
                if r is start:
                    found = o
                    break
                if id(r) in ids and id(r) not in prev:
                    prev[id(r)] = o
                    queue.append(r)
        if found is None:
            f.write(f"  cycle from {name}: none\n")
            continue
        path = []
        o = found
        while o is not start:
            path.append(o)
            o = prev[id(o)]
        path = [start] + path[::-1] + [start]
        steps = [name] + [_how(a, b) + " " + type(b).__qualname__ for a, b in zip(path, path[1:])]
        f.write(f"  cycle from {name}: " + " ".join(steps) + "\n")


def _dump(signum, frame):
    import collections
    import ctypes
    import gc

    _dump.n = getattr(_dump, "n", 0) + 1
    base = f"{_PATH}-{_dump.n}"
    with open(base + ".txt", "w") as f:
        _state(f, "as found")
        gc.set_debug(gc.DEBUG_SAVEALL)
        n = gc.collect()
        gc.set_debug(0)
        types = collections.Counter(
            type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage
        )
        f.write(f"garbage found by a full collection: {n} objects\n")
        for k, v in types.most_common(40):
            f.write(f"  {v:8d} {k}\n")
        try:
            _cycles(f, gc.garbage)
        except Exception as e:  # a diagnosis: never take the server down
            f.write(f"  cycles: {e!r}\n")
        gc.garbage.clear()
        del types
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        _state(f, "after gc.collect() and malloc_trim(0)")
    open(base + ".done", "w").close()


if _PATH:
    signal.signal(signal.SIGUSR2, _dump)
