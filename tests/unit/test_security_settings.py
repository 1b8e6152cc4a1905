"""CURVE on ZeroMQ sockets (common/security.py) and the etcd TLS/auth settings, on real sockets."""

import os

import pytest
import zmq

from cluster.config import ConfigError, load, loads
from common import security
from common.etcd.client import EtcdAuth, EtcdConfigError


@pytest.fixture
def curve(tmp_path, monkeypatch):
    monkeypatch.delenv(security.ENV, raising=False)
    key = security.make_keys(tmp_path / "keys")
    security.configure(key)
    yield key
    security.configure(None)


def _pull(ctx):
    s = security.server(ctx.socket(zmq.PULL))
    s.setsockopt(zmq.LINGER, 0)
    return s, s.bind_to_random_port("tcp://127.0.0.1")


def _push(ctx, port, secure=True, keypair=None):
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    if secure:
        security.client(s)
    if keypair:  # a stranger that knows the server's public key, with a keypair of its own
        s.curve_publickey, s.curve_secretkey = keypair
        s.curve_serverkey = security._current().public
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def test_only_holders_of_the_cluster_key_get_through(curve):
    ctx = zmq.Context()
    try:
        pull, port = _pull(ctx)
        pushes = [_push(ctx, port)]  # kept: a socket collected with LINGER 0 drops what it queued
        pushes[-1].send(b"member")
        assert pull.poll(3000) and pull.recv() == b"member"
        pushes.append(_push(ctx, port, secure=False))
        pushes[-1].send(b"plaintext")
        pushes.append(_push(ctx, port, secure=False, keypair=zmq.curve_keypair()))
        pushes[-1].send(b"stranger")
        assert not pull.poll(1500), "a peer without the cluster key got a message through"
        pushes.append(_push(ctx, port))  # members still get through after the refusals
        pushes[-1].send(b"again")
        assert pull.poll(3000) and pull.recv() == b"again"
    finally:
        ctx.destroy(0)


def test_a_plaintext_server_does_not_talk_to_a_curve_client(curve, monkeypatch):
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = _push(ctx, port)
        push.send(b"secret")
        assert not pull.poll(1000)
    finally:
        ctx.destroy(0)


def test_the_setting_comes_from_the_environment_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.delenv(security.ENV, raising=False)
    security.configure(None)
    assert not security.enabled()
    key = security.make_keys(tmp_path)
    monkeypatch.setenv(security.ENV, str(key))  # what a child process of a configured one sees
    assert security.enabled()
    assert security._current().public == security.load_keypair(key)[0]
    monkeypatch.delenv(security.ENV)
    assert not security.enabled()


def test_key_files_are_checked(tmp_path):
    key = security.make_keys(tmp_path)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(security.SecurityError, match="exists already"):
        security.make_keys(tmp_path)
    with pytest.raises(security.SecurityError, match="does not exist"):
        security.load_keypair(tmp_path / "nope")
    with pytest.raises(security.SecurityError, match="no secret key"):
        key.with_suffix(".key").chmod(0o600)
        security.load_keypair(key.with_suffix(".key"))
    key.chmod(0o644)
    with pytest.raises(security.SecurityError, match="readable by other users"):
        security.load_keypair(key)
    bad = tmp_path / "bad.key_secret"
    bad.write_text("not a certificate")
    bad.chmod(0o600)
    with pytest.raises(security.SecurityError):
        security.load_keypair(bad)


def test_etcd_auth_settings_are_checked_and_exported(tmp_path, monkeypatch):
    for var in ("TANDEM_ETCD_CA", "TANDEM_ETCD_CERT", "TANDEM_ETCD_KEY", "TANDEM_ETCD_USER",
                "TANDEM_ETCD_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(EtcdConfigError, match="does not exist"):
        EtcdAuth(ca=str(tmp_path / "missing.pem")).check()
    with pytest.raises(EtcdConfigError, match="certificate and its key"):
        EtcdAuth(ca=str(ca), cert=str(ca)).check()
    with pytest.raises(EtcdConfigError, match="user and a password file"):
        EtcdAuth(user="root").check()
    EtcdAuth(ca=str(ca)).check().export()
    assert os.environ["TANDEM_ETCD_CA"] == str(ca) and EtcdAuth.from_env() == EtcdAuth(ca=str(ca))
    assert EtcdAuth.from_env().tls and not EtcdAuth().tls


def test_cluster_file_security_paths_are_relative_to_the_file(tmp_path):
    f = tmp_path / "conf" / "cluster.toml"
    f.parent.mkdir()
    f.write_text('[security]\ncurve_key = "keys/cluster.key_secret"\n'
                 '[etcd]\nca = "/pki/ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n')
    spec = load(f)
    assert spec.security.curve_key == str(tmp_path / "conf" / "keys" / "cluster.key_secret")
    assert spec.etcd.ca == "/pki/ca.pem" and spec.etcd.cert == str(tmp_path / "conf" / "c.pem")
    with pytest.raises(ConfigError, match="etcd.cert = 'c.pem': a client certificate needs its key"):
        loads('[etcd]\ncert = "c.pem"\n')
    with pytest.raises(ConfigError, match="server_cert, server_key and ca"):
        loads('[etcd]\nserver_cert = "s.pem"\nserver_key = "k.pem"\n')
    with pytest.raises(ConfigError, match="unknown field 'curve'"):
        loads('[security]\ncurve = "x"\n')

