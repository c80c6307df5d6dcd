"""TLS and mutual TLS at the ingress, with certificates the test makes (``cryptography``), and ``pipeline infer`` over them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import (  # noqa: E402
    FakeWorker,
    IngressThread,
    env_without_pipeline_vars,
    fake_workers,
    outputs_of,
    raw_request,
    single_topology,
    sock_dir,
    toy_compute,
    toy_inputs,
)

from pipeline.errors import UsageError  # noqa: E402
from pipeline.pb import grpc_service_pb2 as kpb  # noqa: E402
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from pipeline.security import tls  # noqa: E402
from pipeline.serving import client  # noqa: E402
from pipeline.serving.ingress import IngressConfig  # noqa: E402
from pipeline.topology import Topology  # noqa: E402

pytestmark = pytest.mark.timeout(60)
RPC_S = 5.0


# ------------------------------------------------------------ certificates
def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def _issue(
    subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, server: bool = False, ca: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256()), key


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: str  # the CA that signs the server and the good client
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str  # a client certificate from another CA
    rogue_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _issue("pipeline test CA", None, ca=True)
    other_ca = _issue("someone else's CA", None, ca=True)
    ca_path, _ = _write(d, "ca", ca[1], ca[0])
    server = _write(d, "server", *reversed(_issue("localhost", ca, server=True)))
    good = _write(d, "client", *reversed(_issue("pipeline client", ca)))
    rogue = _write(d, "rogue", *reversed(_issue("rogue client", other_ca)))
    return Pki(ca_path, *server, *good, *rogue)


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Topology]:
    with sock_dir() as sockets:
        yield single_topology(tmp_path / "toy", sockets)


def _infer(channel: grpc.Channel) -> dict[str, np.ndarray]:
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    inputs = toy_inputs(3, seed=5)
    response = stub.ModelInfer(raw_request("toy", inputs), timeout=RPC_S)
    out = outputs_of(response)
    np.testing.assert_array_equal(out["y"], toy_compute(inputs)["y"])
    return out


def _wait_ready(channel: grpc.Channel) -> None:
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    for _ in range(200):
        if stub.ServerReady(kpb.ServerReadyRequest(), timeout=RPC_S).ready:
            return
        import time

        time.sleep(0.05)
    raise AssertionError("the ingress did not become ready")


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ServerLive(kpb.ServerLiveRequest(), timeout=2)
    return excinfo.value.code()


# ------------------------------------------------------------------- tests
def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(toy: Topology, pki: Pki) -> None:
    with IngressThread(toy, tls_cert=pki.server_cert, tls_key=pki.server_key) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)):
        with tls.open_channel(ing.target, ca=pki.ca) as channel:
            _wait_ready(channel)
            _infer(channel)
        with tls.open_channel(f"localhost:{ing.port}", ca=pki.ca) as channel:  # the DNS name in the certificate
            _infer(channel)
        with grpc.insecure_channel(ing.target) as channel:
            assert _refused(channel) == grpc.StatusCode.UNAVAILABLE
        with tls.open_channel(ing.target, ca=pki.rogue_cert) as channel:  # trusts a CA that did not sign the server
            assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(toy: Topology, pki: Pki) -> None:
    config = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with IngressThread(toy, **config) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)):
        with tls.open_channel(ing.target, ca=pki.ca, cert=pki.client_cert, key=pki.client_key) as channel:
            _wait_ready(channel)
            _infer(channel)
        with tls.open_channel(ing.target, ca=pki.ca) as channel:  # no client certificate
            assert _refused(channel) == grpc.StatusCode.UNAVAILABLE
        with tls.open_channel(ing.target, ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key) as channel:
            assert _refused(channel) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(ing.target) as channel:
            assert _refused(channel) == grpc.StatusCode.UNAVAILABLE
        # and the server still answers the good client afterwards
        with tls.open_channel(ing.target, ca=pki.ca, cert=pki.client_cert, key=pki.client_key) as channel:
            _infer(channel)


def test_pipeline_infer_speaks_mutual_tls(toy: Topology, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with IngressThread(toy, **config) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)):
        parser = argparse.ArgumentParser()
        client.add_arguments(parser)
        good = ["--target", ing.target, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
        with tls.open_channel(ing.target, ca=pki.ca, cert=pki.client_cert, key=pki.client_key) as channel:
            _wait_ready(channel)
        assert client.run(parser.parse_args([*good, "--batch", "2"])) == 0
        assert "output y: shape [2, 3] datatype FP32" in capsys.readouterr().out
        assert client.run(parser.parse_args(["--target", ing.target, "--tls-ca", pki.ca, "--timeout", "3"])) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err


def test_tls_settings_are_read_from_the_command_line_and_environment_and_checked(toy: Topology, pki: Pki, tmp_path: Path) -> None:
    from pipeline.serving import ingress

    parser = argparse.ArgumentParser()
    ingress.add_arguments(parser)
    args = parser.parse_args([str(toy.directory), "--tls-cert", pki.server_cert, "--tls-key", pki.server_key])
    env = {**env_without_pipeline_vars(), "PIPELINE_INGRESS_TLS_CLIENT_CA": pki.ca}
    config = IngressConfig.resolve(toy, args, env)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (pki.server_cert, pki.server_key, pki.ca)
    with pytest.raises(UsageError, match="--tls-key"):
        tls.server_credentials(pki.server_cert, None)
    with pytest.raises(UsageError, match="needs --tls-cert and --tls-key"):
        tls.server_credentials(None, None, pki.ca)
    with pytest.raises(UsageError, match="cannot be read"):
        tls.server_credentials(str(tmp_path / "missing.crt"), pki.server_key)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(UsageError, match="not a PEM file"):
        tls.server_credentials(str(not_pem), pki.server_key)
    # a bad file stops the ingress at start, before it binds anything
    bad = dataclasses.replace(config, address="127.0.0.1:0", tls_cert=str(not_pem), tls_client_ca="")
    with pytest.raises(UsageError, match="not a PEM file"):
        asyncio.run(ingress.create_server(toy, bad))


def test_pipeline_soak_speaks_mutual_tls(toy: Topology, pki: Pki, tmp_path: Path) -> None:
    """`pipeline soak --tls-ca/--tls-cert/--tls-key` checks answers over mutual TLS; without a client certificate nothing passes."""
    from pipeline.soak import replay
    from pipeline.soak import soak as soak_mod
    from tests.helpers_ingress import toy_inputs

    inputs = [toy_inputs(1, seed=i) for i in range(6)]
    path = replay.write(
        tmp_path / "toy.npz", "toy", [("x", "float32"), ("ids", "int64")], [("y", "float32")],
        [replay.Request(x, toy_compute(x)) for x in inputs],
    )  # fmt: skip
    config = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with IngressThread(toy, **config) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)):
        base = soak_mod.SoakConfig(target=ing.target, replay=path, duration_s=2.0, concurrency=2, interval_s=1.0, wait_ready_s=20, progress=False)
        good = dataclasses.replace(base, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        report = asyncio.run(soak_mod.Soak(good, replay.load(path)).run())
        assert report["verdict"]["ok"] and report["totals"]["correct"] > 0 and report["totals"]["wrong"] == 0, report["totals"]
        anonymous = dataclasses.replace(base, tls_ca=pki.ca, wait_ready_s=2)
        with pytest.raises(Exception, match="ready|UNAVAILABLE|handshake"):
            asyncio.run(soak_mod.Soak(anonymous, replay.load(path)).run())
