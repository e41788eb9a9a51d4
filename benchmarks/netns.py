"""Real heterogeneous links for local multi-rank benchmarks (Linux network
namespaces + veth + bridge + ``tc``).

    python benchmarks/netns.py --check                  # can this machine do it? which qdiscs?
    python benchmarks/netns.py --selftest [--rates 1000,100,50,10]   # measure the shaped links
    python benchmarks/netns.py --cleanup [--run PID]    # remove leftovers of dead runs (and of run PID)

Topology (nothing is added to the root namespace: no interface, address or route)::

    ns <prefix>-<pid>-r0 [eth0 10.231.0.10] --veth-- r0 ┐
    ns <prefix>-<pid>-r1 [eth0 10.231.0.11] --veth-- r1 ├ br0   (ns <prefix>-<pid>-br)
    ...                                               ... ┘

One namespace per rank (workers and parameter servers), each joined by a veth
pair to a Linux bridge that lives in its own namespace.  Addresses come from a
private /24 (default ``10.231.0.0/24``) that exists only inside these
namespaces, so ranks can reach only each other (and their own loopback).

A rank's link is shaped in both directions: egress of the rank-side veth
(upload) and egress of the bridge-side veth (download) each get a TBF qdisc
(:func:`tbf_params`) at ``rate_mbit``; a one-way delay is added with ``netem``
as its child when the kernel has ``sch_netem`` (some kernels do not:
``delay_applied_ms`` then says 0 and the caller must model latency instead).
Rank-to-rank traffic crosses the sender's upload and the receiver's download,
like a star network around a switch.

Everything is removed afterwards: :meth:`NetnsCluster.teardown` runs from
``try/finally`` (context manager), ``atexit`` and SIGTERM/SIGHUP; names carry a
fixed prefix and the owner's pid, so leftovers of a crashed run (owner pid
gone) are removed whenever a new cluster is set up or by ``--cleanup``;
namespaces of a live concurrent run are never removed (``--cleanup --run PID``
removes that run's own too).  Launched ranks run in their own process groups and are killed on
timeout or teardown.

Without root or without ``ip``/``tc`` use :func:`netns_support` to find out and
fall back to plain local processes (links then only *modelled*).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

PREFIX = "esdbench"
SUBNET = "10.231.0"  # /24, private, assigned only inside our namespaces
HOST_BASE = 10  # rank r gets SUBNET.(HOST_BASE + r)
IFACE = "eth0"  # rank-side veth name inside each rank namespace
CMD_TIMEOUT_S = 20.0


class NetnsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    """One rank's link to the bridge: ``rate_mbit`` None = unshaped."""

    rate_mbit: Optional[float] = None
    delay_ms: float = 0.0


# ------------------------------------------------------------------ helpers
def _run(args: Sequence[str], check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces(prefix: str = PREFIX) -> List[str]:
    if shutil.which("ip") is None:
        return []
    p = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def namespace_owner(name: str, prefix: str = PREFIX) -> Optional[int]:
    """The pid in ``<prefix>-<pid>-...`` (the process that created it), or None."""
    if not name.startswith(prefix + "-"):
        return None
    head = name[len(prefix) + 1 :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def cleanup(prefix: str = PREFIX, run: Optional[int] = None) -> List[str]:
    """Delete leftover namespaces of ours: those whose owner pid (in the name,
    ``<prefix>-<pid>-*``) is gone, plus every namespace of run ``run`` (a pid;
    e.g. a run of this process that is being torn down).  A namespace of
    another live process is never touched, so concurrent runs on one machine
    keep theirs.  Deleting a namespace deletes its veth ends (and the bridge
    with the bridge namespace).  Returns the removed names."""
    removed = []
    for name in list_namespaces(prefix):
        owner = namespace_owner(name, prefix)
        if owner is None:
            continue  # not named by this module: not ours to judge
        if owner != run and (owner == os.getpid() or _pid_alive(owner)):
            continue
        _kill_namespace_processes(name)
        if _run(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
    return removed


def _kill_namespace_processes(name: str) -> None:
    """Kill processes still running in a leftover namespace of ours."""
    p = _run(["ip", "netns", "pids", name], check=False)
    for tok in p.stdout.split():
        try:
            pid = int(tok)
        except ValueError:
            continue
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


_QDISC_CACHE: Dict[str, bool] = {}


def tbf_burst(rate_mbit: float) -> int:
    """The TBF bucket of a link at ``rate_mbit``: ~1 ms of traffic, at least 4000 B."""
    return max(4_000, int(float(rate_mbit) * 1e6 / 8 * 0.001))


def tbf_params(rate_mbit: float, burst: Optional[int] = None) -> List[str]:
    """``tc ... tbf`` arguments of a link at ``rate_mbit``: burst ~1 ms of
    traffic and at least 4000 B (two full frames), queue 15 MB (no drops, as
    with the former 10000-packet fifo).

    Why TBF and not HTB: the ranks' TCP hands their devices 64 kB GSO
    packets.  HTB charges such a packet when it dequeues it and lets it go
    at line rate while the class has any tokens, so a reply of up to ~60 kB
    crossed a "10 Mbit/s" link in under a millisecond and the next one paid
    for it (measured in the rate-change benchmark: 40-64 kB replies in 0-0.6
    ms, 70-94 kB ones in a flat ~51 ms; the online link estimates, issue 19,
    drifted from 10 to 15-20 Mbit/s on them).  TBF cuts a GSO packet larger
    than its burst into frames before it queues them: between two namespaces,
    sender GSO on, 60 kB to 600 kB transfers after an idle gap then measured
    9.7-10.2 Mbit/s of payload on a 10 Mbit/s link (HTB with its former 16 kB
    burst: 60 kB at 17-26 Mbit/s, 150 kB at 12.5)."""
    burst = tbf_burst(rate_mbit) if burst is None else int(burst)
    return ["rate", f"{float(rate_mbit):g}mbit", "burst", str(burst), "limit", "15000000"]


def qdisc_available(kind: str) -> bool:
    """Whether the running kernel accepts qdisc ``kind`` (probed on a
    throw-away veth in a scratch namespace)."""
    if kind in _QDISC_CACHE:
        return _QDISC_CACHE[kind]
    ns = f"{PREFIX}-{os.getpid()}-probe"
    ok = False
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        params = {
            "netem": ["delay", "1ms"],
            "htb": ["default", "1"],
            "tbf": ["rate", "10mbit", "burst", "32kb", "latency", "50ms"],
        }.get(kind, [])
        ok = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "pa", "root", kind] + params,
                  check=False).returncode == 0
    except (NetnsError, OSError, subprocess.TimeoutExpired):
        ok = False
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    _QDISC_CACHE[kind] = ok
    return ok


def netns_support() -> Tuple[bool, str]:
    """(usable, reason): root, ``ip`` and ``tc`` present, namespaces, veth
    and the TBF qdisc work."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return False, "not Linux"
    if os.geteuid() != 0:
        return False, "not root (network namespaces and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    ns = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"network namespaces / veth do not work here: {e}"
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    if not qdisc_available("tbf"):
        return False, "the tbf qdisc (sch_tbf) is not available in this kernel"
    return True, "ok"


# ------------------------------------------------------------------ cluster
class NetnsCluster:
    """``len(links)`` rank namespaces around one bridge; rank ``r`` has
    address ``SUBNET.(10 + r)`` on ``eth0`` and link ``links[r]``.

    ``max_packet_bytes``: cap every veth's GSO packets at that size
    (``ip link set ... gso_max_size``), so that no queued packet can exceed
    a smaller TBF bucket that :meth:`set_rate` puts in place (for runs whose
    links change rate; default: the kernel's 64 kB GSO packets)."""

    def __init__(self, links: Sequence[Link], prefix: str = PREFIX, subnet: str = SUBNET,
                 max_packet_bytes: Optional[int] = None) -> None:
        if not links:
            raise NetnsError("a cluster needs at least one rank")
        if len(links) > 200:
            raise NetnsError("at most 200 ranks per cluster")
        if max_packet_bytes is not None and not 1500 <= int(max_packet_bytes) <= 65536:
            raise NetnsError(f"max_packet_bytes must be in [1500, 65536], got {max_packet_bytes}")
        self.max_packet_bytes = None if max_packet_bytes is None else int(max_packet_bytes)
        self.prefix, self.subnet = prefix, subnet
        self.tag = f"{prefix}-{os.getpid()}"
        self.links: List[Link] = list(links)
        self.bridge_ns = f"{self.tag}-br"
        self.rank_ns = [f"{self.tag}-r{r}" for r in range(len(links))]
        self.procs: List[subprocess.Popen] = []
        self.applied: List[Dict] = []
        self._up = False
        self._lock = threading.Lock()
        self.netem = False
        self.removed_stale: List[str] = []

    # -- addresses
    @property
    def size(self) -> int:
        return len(self.links)

    def addr(self, rank: int) -> str:
        return f"{self.subnet}.{HOST_BASE + rank}"

    def bridge_port(self, rank: int) -> str:
        return f"r{rank}"

    # -- lifecycle
    def setup(self) -> "NetnsCluster":
        ok, why = netns_support()
        if not ok:
            raise NetnsError(f"network namespaces unavailable: {why}")
        self.removed_stale = cleanup(self.prefix)
        # our own pid's leftovers (e.g. an earlier cluster in this process)
        for name in list_namespaces(self.prefix):
            if name.startswith(self.tag + "-"):
                _kill_namespace_processes(name)
                _run(["ip", "netns", "del", name], check=False)
        self.netem = qdisc_available("netem")
        atexit.register(self.teardown)
        self._install_signal_handlers()
        self._up = True
        try:
            br = self.bridge_ns
            _run(["ip", "netns", "add", br])
            _run(["ip", "-n", br, "link", "set", "lo", "up"])
            _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", br, "link", "set", "br0", "up"])
            for r, ns in enumerate(self.rank_ns):
                _run(["ip", "netns", "add", ns])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                port = self.bridge_port(r)
                _run(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", ns])
                _run(["ip", "-n", br, "link", "set", port, "master", "br0"])
                _run(["ip", "-n", br, "link", "set", port, "up"])
                if self.max_packet_bytes is not None:
                    _run(["ip", "-n", br, "link", "set", "dev", port, "gso_max_size", str(self.max_packet_bytes)])
                    _run(["ip", "-n", ns, "link", "set", "dev", IFACE, "gso_max_size", str(self.max_packet_bytes)])
                _run(["ip", "-n", ns, "addr", "add", f"{self.addr(r)}/24", "dev", IFACE])
                _run(["ip", "-n", ns, "link", "set", IFACE, "up"])
            self.apply(self.links)
        except BaseException:
            self.teardown()
            raise
        return self

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):  # noqa: ARG001
            self.teardown()
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass

    def teardown(self) -> None:
        """Kill our ranks, delete our namespaces (idempotent)."""
        with self._lock:
            self.kill_all()
            if not self._up:
                return
            for ns in self.rank_ns + [self.bridge_ns]:
                try:
                    _kill_namespace_processes(ns)
                    _run(["ip", "netns", "del", ns], check=False)
                except Exception:  # noqa: BLE001 - best effort, keep going
                    pass
            self._up = False

    def __enter__(self) -> "NetnsCluster":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()

    # -- shaping
    @staticmethod
    def _tbf(exec_tc: List[str], verb: str, dev: str, rate_mbit: float, burst: Optional[int] = None) -> None:
        _run(exec_tc + ["qdisc", verb, "dev", dev, "root", "handle", "1:", "tbf"] + tbf_params(rate_mbit, burst))

    def _shape(self, ns: str, dev: str, link: Link) -> Dict:
        exec_tc = ["ip", "netns", "exec", ns, "tc"]
        _run(exec_tc + ["qdisc", "del", "dev", dev, "root"], check=False)
        if link.rate_mbit is None and not (link.delay_ms > 0 and self.netem):
            return {"rate_mbit": None, "delay_ms": 0.0}
        # unshaped but delayed: a rate the veth never reaches
        rate = float(link.rate_mbit) if link.rate_mbit is not None else 100_000.0
        self._tbf(exec_tc, "add", dev, rate)  # its own byte fifo unless netem below replaces it
        delay = 0.0
        if link.delay_ms > 0 and self.netem:
            _run(exec_tc + ["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                            "delay", f"{link.delay_ms:g}ms", "limit", "100000"])
            delay = link.delay_ms
        return {"rate_mbit": link.rate_mbit, "delay_ms": delay}

    def apply(self, links: Sequence[Link]) -> List[Dict]:
        """(Re)shape every rank's link in both directions; returns what was
        applied per rank (``delay_ms`` is 0 where netem is missing)."""
        if len(links) != self.size:
            raise NetnsError(f"{len(links)} links for {self.size} ranks")
        self.links = list(links)
        self.bursts: Dict[int, int] = {}  # a link's largest TBF bucket since its qdisc was made (set_rate)
        applied = []
        for r, link in enumerate(self.links):
            up = self._shape(self.rank_ns[r], IFACE, link)  # rank -> bridge
            down = self._shape(self.bridge_ns, self.bridge_port(r), link)  # bridge -> rank
            applied.append({
                "rank": r, "namespace": self.rank_ns[r], "addr": self.addr(r),
                "requested": asdict(link), "upload": up, "download": down,
            })
        self.applied = applied
        return applied

    def set_rate(self, rank: int, rate_mbit: float) -> Dict:
        """Change the rate of a shaped rank's link in both directions in
        place (``tc qdisc change`` of its TBF: queued packets and the netem
        child stay).  The bucket never shrinks below a packet that may be
        queued: a TBF change does not re-cut packets already queued, so a
        packet that fit the old bucket but not the new one would never leave,
        and the link would stall for good (seen in session 10: a 100 -> 10
        Mbit/s change left 95 kB stuck in the download queue of worker 3,
        whose store heartbeat then went silent).  With ``max_packet_bytes``
        no packet exceeds that, and the bucket is the new rate's; without,
        queued packets may be as large as the largest bucket the link had
        (:attr:`bursts`), which the link then keeps."""
        link = self.links[rank]
        if link.rate_mbit is None:
            raise NetnsError(f"rank {rank}'s link is unshaped: apply() a rate first")
        largest = self.max_packet_bytes or self.bursts.get(rank, tbf_burst(link.rate_mbit))
        burst = max(tbf_burst(rate_mbit), largest)
        for ns, dev in ((self.rank_ns[rank], IFACE), (self.bridge_ns, self.bridge_port(rank))):
            self._tbf(["ip", "netns", "exec", ns, "tc"], "change", dev, float(rate_mbit), burst)
        self.links[rank] = Link(float(rate_mbit), link.delay_ms)
        self.bursts[rank] = burst
        return {"rank": rank, "rate_mbit": float(rate_mbit), "burst": burst}

    def qdiscs(self, rank: int) -> str:
        a = _run(["ip", "netns", "exec", self.rank_ns[rank], "tc", "qdisc", "show", "dev", IFACE], check=False)
        b = _run(["ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "show", "dev", self.bridge_port(rank)],
                 check=False)
        return f"up: {a.stdout.strip()} | down: {b.stdout.strip()}"

    def counters(self, rank: int) -> Dict[str, int]:
        """Bytes/packets through rank ``rank``'s eth0 (from the parent)."""
        p = _run(["ip", "-n", self.rank_ns[rank], "-s", "-j", "link", "show", IFACE])
        st = json.loads(p.stdout)[0]["stats64"]
        return {"tx_bytes": int(st["tx"]["bytes"]), "rx_bytes": int(st["rx"]["bytes"])}

    # -- processes
    def popen(self, rank: int, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              stdout=None, stderr=None) -> subprocess.Popen:
        """Start ``argv`` inside rank ``rank``'s namespace (own process group)."""
        e = dict(os.environ if env is None else env)
        e.setdefault("GLOO_SOCKET_IFNAME", IFACE)
        p = subprocess.Popen(["ip", "netns", "exec", self.rank_ns[rank]] + list(argv), env=e,
                             stdout=stdout, stderr=stderr, start_new_session=True)
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass


def rank_env(rank: int, world: int, master_addr: str, master_port: int, iface: Optional[str]) -> Dict[str, str]:
    """torchrun-like environment of one rank."""
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    if iface:
        env["GLOO_SOCKET_IFNAME"] = iface
    else:
        env.pop("GLOO_SOCKET_IFNAME", None)
    return env


def launch_world(argv: Sequence[str], world: int, timeout_s: float, logdir: str,
                 cluster: Optional[NetnsCluster] = None, master_port: int = 29555,
                 poll=None) -> List[int]:
    """Run ``argv`` as ranks ``0..world-1`` (inside ``cluster``'s namespaces,
    or as plain local processes on 127.0.0.1 when ``cluster`` is None); the
    rank's stdout/stderr go to ``logdir/rank<r>.log``.  ``poll()`` is called
    about 10 times a second while they run.  Kills everything on timeout or if
    a rank fails; returns the exit codes."""
    procs, files = [], []
    master = cluster.addr(0) if cluster else "127.0.0.1"
    if cluster is None:
        from contextlib import closing

        with closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            master_port = s.getsockname()[1]
    try:
        for r in range(world):
            f = open(os.path.join(logdir, f"rank{r}.log"), "w")
            files.append(f)
            env = rank_env(r, world, master, master_port, IFACE if cluster else "lo")
            if cluster:
                procs.append(cluster.popen(r, argv, env, stdout=f, stderr=subprocess.STDOUT))
            else:
                procs.append(subprocess.Popen(list(argv), env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes
            if any(c not in (None, 0) for c in codes):
                time.sleep(5)  # let the others report their own error, then stop them
                break
            if time.monotonic() > deadline:
                print(f"[netns] world did not finish within {timeout_s:.0f} s: killing it", file=sys.stderr)
                break
            if poll is not None:
                poll()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait(timeout=10)
        for f in files:
            f.close()
    return [p.returncode if p.returncode is not None else -9 for p in procs]


# ------------------------------------------------------------------ self test
_SINK = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(64)
def serve(c):
    # protocol: 8-byte n_up, 8-byte n_down; read n_up bytes, send n_down bytes
    hdr = b""
    while len(hdr) < 16:
        hdr += c.recv(16 - len(hdr))
    up, down = int.from_bytes(hdr[:8], "big"), int.from_bytes(hdr[8:], "big")
    got = 0
    while got < up:
        got += len(c.recv(1 << 20))
    c.sendall(b"\0" * down); c.close()
print("ready", flush=True)
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

_CLIENT = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def xfer(up, down):
    c = socket.create_connection((host, port), timeout=60)
    t0 = time.perf_counter(); c.sendall(up.to_bytes(8, "big") + down.to_bytes(8, "big"))
    c.sendall(b"\0" * up)
    got = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        got += len(b)
    c.close(); return time.perf_counter() - t0, got
t_rtt, _ = xfer(1, 1)
t_up, _ = xfer(n, 1)
t_down, got = xfer(1, n)
print(f"{t_rtt} {t_up} {t_down} {got}")
"""


def selftest(rates: Sequence[Optional[float]], nbytes: int = 2_000_000, delay_ms: float = 0.0,
             timeout_s: float = 120.0) -> List[Dict]:
    """Shape ``len(rates)`` client links plus one unshaped server link, move
    ``nbytes`` up and down each client link one after the other, and return
    the measured Mbit/s per link (and a small-message round-trip time)."""
    links = [Link(r, delay_ms) for r in rates] + [Link(None, 0.0)]
    out = []
    with NetnsCluster(links) as cl:
        server = len(rates)
        sink = cl.popen(server, [sys.executable, "-c", _SINK, cl.addr(server), "5001"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = sink.stdout.readline().decode().strip()
        if line != "ready":
            raise NetnsError(f"sink did not start: {line} {sink.stderr.read().decode()[:500]}")
        for r, rate in enumerate(rates):
            p = cl.popen(r, [sys.executable, "-c", _CLIENT, cl.addr(server), "5001", str(nbytes)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                so, se = p.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                cl.kill_all()
                raise NetnsError(f"rank {r}: transfer did not finish in {timeout_s} s")
            if p.returncode != 0:
                raise NetnsError(f"rank {r} client failed: {se.decode()[-500:]}")
            t_rtt, t_up, t_down, got = so.decode().split()
            out.append({
                "rank": r, "rate_mbit": rate, "delay_ms_applied": cl.applied[r]["upload"]["delay_ms"],
                "up_mbit_s": nbytes * 8 / float(t_up) / 1e6, "down_mbit_s": int(got) * 8 / float(t_down) / 1e6,
                "small_rtt_ms": float(t_rtt) * 1e3, "qdisc": cl.qdiscs(r),
            })
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="report whether netns/tc shaping works here")
    g.add_argument("--selftest", action="store_true", help="shape links and measure them with sockets")
    g.add_argument("--cleanup", action="store_true",
                   help=f"remove leftover '{PREFIX}-<pid>-*' namespaces whose owner process is gone (and with "
                        "--run PID that run's own); namespaces of live concurrent runs are kept")
    p.add_argument("--rates", default="1000,100,50,10", help="Mbit/s per shaped link (selftest)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per link (needs netem)")
    p.add_argument("--bytes", type=int, default=2_000_000)
    p.add_argument("--run", type=int, default=None, metavar="PID",
                   help="--cleanup: also remove the namespaces of this run (its launcher's pid), even if alive")
    a = p.parse_args(argv)
    if a.run is not None and not a.cleanup:
        p.error("--run goes with --cleanup")
    if a.cleanup:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            print("nothing to clean: not root or no `ip`")
            return 0
        removed = cleanup(PREFIX, run=a.run)
        kept = [n for n in list_namespaces() if n not in removed]
        print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
        if kept:
            print(f"kept {len(kept)} namespaces of live runs: {' '.join(kept)}")
        return 0
    ok, why = netns_support()
    if a.check:
        info = {"usable": ok, "reason": why}
        if ok:
            info.update({k: qdisc_available(k) for k in ("htb", "tbf", "netem")})
        print(json.dumps(info))
        return 0 if ok else 1
    if not ok:
        print(f"cannot shape links here: {why}")
        return 1
    rates = [float(x) for x in a.rates.split(",")]
    for row in selftest(rates, a.bytes, a.delay_ms):
        print(json.dumps(row))
    left = [n for n in list_namespaces() if n.startswith(f"{PREFIX}-{os.getpid()}-")]
    print(f"namespaces left after teardown: {left or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
