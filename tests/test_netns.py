"""benchmarks/netns.py: shaped links between rank namespaces, nothing left behind.

Needs root and iproute2 (network namespaces, veth, bridge, tc); skips otherwise.
"""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import netns  # noqa: E402

OK, WHY = netns.netns_support()
pytestmark = pytest.mark.skipif(not OK, reason=f"network namespaces unavailable: {WHY}")


def _root_links():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def test_shaped_link_rate_and_teardown():
    before = _root_links()
    with netns.NetnsCluster([netns.Link(20.0), netns.Link(None)]) as cl:
        tag = cl.tag
        assert _root_links() == before  # nothing added to the root namespace
        assert set(netns.list_namespaces()) >= set(cl.rank_ns + [cl.bridge_ns])
        assert "tbf" in cl.qdiscs(0) and "rate 20Mbit" in cl.qdiscs(0)
    assert not [n for n in netns.list_namespaces() if n.startswith(tag + "-")]
    # the measured rate of a 20 Mbit/s link, both directions
    rows = netns.selftest([20.0], nbytes=600_000, timeout_s=20)
    assert not [n for n in netns.list_namespaces() if n.startswith(f"{netns.PREFIX}-{os.getpid()}-")]
    r = rows[0]
    assert 10.0 < r["up_mbit_s"] < 23.0, r
    assert 10.0 < r["down_mbit_s"] < 23.0, r
    assert _root_links() == before


def test_small_transfers_do_not_pass_a_slow_link_at_line_rate():
    # 64 kB GSO packets through an HTB class went at line rate: 60 kB measured 15-17 Mbit/s
    # up and ~12 down on a 10 Mbit/s link (three runs); TBF cuts them into frames
    for _ in range(2):
        r = netns.selftest([10.0], nbytes=60_000, timeout_s=20)[0]
        assert 7.0 < r["up_mbit_s"] < 11.5, r
        assert 7.0 < r["down_mbit_s"] < 11.5, r


def test_stale_namespaces_of_dead_owners_are_removed():
    dead = 4_194_000
    while netns._pid_alive(dead):
        dead -= 1
    name = f"{netns.PREFIX}-{dead}-r0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = netns.cleanup()
        assert name in removed
        assert name not in netns.list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_launch_world_kills_on_timeout(tmp_path):
    with netns.NetnsCluster([netns.Link(None), netns.Link(None)]) as cl:
        codes = netns.launch_world([sys.executable, "-c", "import time; time.sleep(60)"], 2, 1.0,
                                   str(tmp_path), cluster=cl)
        assert all(c != 0 for c in codes)
        assert all(p.poll() is not None for p in cl.procs)


def test_cleanup_keeps_the_namespaces_of_a_live_concurrent_run():
    """``--cleanup`` removes a dead run's namespaces, never a live one's,
    unless that run is named with ``--run``."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = 4_194_000
    while netns._pid_alive(dead):
        dead -= 1
    mine_live, mine_dead = f"{netns.PREFIX}-{live.pid}-r0", f"{netns.PREFIX}-{dead}-r0"
    try:
        for name in (mine_live, mine_dead):
            subprocess.run(["ip", "netns", "add", name], check=True)
        assert netns.main(["--cleanup"]) == 0
        left = netns.list_namespaces()
        assert mine_live in left and mine_dead not in left
        assert netns.main(["--cleanup", "--run", str(live.pid)]) == 0
        assert mine_live not in netns.list_namespaces()
        with pytest.raises(SystemExit):
            netns.main(["--check", "--run", "1"])
    finally:
        live.kill()
        live.wait()
        for name in (mine_live, mine_dead):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _qdiscs(cl, rank):
    """``tc qdisc show`` of both ends of ``rank``'s link (upload, download)."""
    return [subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                           capture_output=True, text=True).stdout
            for ns, dev in ((cl.rank_ns[rank], netns.IFACE), (cl.bridge_ns, cl.bridge_port(rank)))]


def test_set_rate_changes_a_shaped_link_in_place():
    with netns.NetnsCluster([netns.Link(100.0), netns.Link(None)]) as cl:
        cl.set_rate(0, 10.0)
        for out in _qdiscs(cl, 0):
            assert "rate 10Mbit" in out, out
        assert cl.links[0].rate_mbit == 10.0
        # the bucket keeps its 100 Mbit/s size: a packet queued under it must still fit (a smaller one
        # would strand it and stall the link for good)
        assert "burst 12500b" in out, out
        cl.set_rate(0, 1000.0)
        for out in _qdiscs(cl, 0):
            assert "rate 1Gbit" in out and "burst 125000b" in out, out
        with pytest.raises(netns.NetnsError, match="unshaped"):
            cl.set_rate(1, 10.0)


def test_set_rate_with_small_packets_takes_the_new_rates_bucket():
    # GSO packets capped below the smallest bucket: no queued packet can outgrow a smaller one
    with netns.NetnsCluster([netns.Link(100.0), netns.Link(None)], max_packet_bytes=3000) as cl:
        for ns, dev in ((cl.rank_ns[0], netns.IFACE), (cl.bridge_ns, cl.bridge_port(0))):
            out = subprocess.run(["ip", "-d", "-n", ns, "link", "show", dev], capture_output=True, text=True).stdout
            assert "gso_max_size 3000 " in out, out
        cl.set_rate(0, 10.0)
        for out in _qdiscs(cl, 0):
            assert "rate 10Mbit" in out and "burst 4000b" in out, out
    with pytest.raises(netns.NetnsError, match="max_packet_bytes"):
        netns.NetnsCluster([netns.Link(None)], max_packet_bytes=100)
