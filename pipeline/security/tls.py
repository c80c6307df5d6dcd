"""TLS for the gRPC ingress and for ``pipeline infer``.

The ingress serves TLS with ``--tls-cert``/``--tls-key`` (PEM files), and
requires a client certificate signed by ``--tls-client-ca`` when that is
given (mutual TLS). ``pipeline infer`` trusts ``--tls-ca`` (else the system's
roots, with ``--tls``) and presents ``--tls-cert``/``--tls-key`` to a server
that asks for one. Files are read once, at start, and a missing or unreadable
file is a :class:`UsageError` that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from pipeline.errors import UsageError


def _read(path: str | Path | None, what: str) -> bytes | None:
    if not path:
        return None
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise UsageError(f"{what} {str(p)!r} is not a PEM file (expected a '-----BEGIN ...' block)")
    return data


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """Credentials for the ingress's port, or ``None`` for plaintext (no certificate given)."""
    if not cert and not key:
        if client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if not (cert and key):
        raise UsageError(f"TLS needs both --tls-cert and --tls-key; received only {'--tls-cert' if cert else '--tls-key'}")
    chain = _read(cert, "--tls-cert")
    private = _read(key, "--tls-key")
    roots = _read(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def add_port(server: Any, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind the gRPC address, with TLS when ``credentials``; return the port (0 when binding failed)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def channel_credentials(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca`` (else the system roots); present ``cert``/``key`` when given."""
    if bool(cert) != bool(key):
        raise UsageError(f"a client certificate needs both --tls-cert and --tls-key; received only {'--tls-cert' if cert else '--tls-key'}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca"),
        private_key=_read(key, "--tls-key"),
        certificate_chain=_read(cert, "--tls-cert"),
    )


def open_aio_channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """:func:`open_channel` for asyncio clients (``pipeline soak``)."""
    options, credentials = _channel_settings(options, tls, ca, cert, key, server_name)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def _channel_settings(
    options: Sequence[tuple[str, Any]], tls: bool, ca: str | None, cert: str | None, key: str | None, server_name: str | None
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """Channel options and credentials: ``None`` credentials (plaintext) unless TLS is asked for."""
    options = list(options)
    if not (tls or ca or cert or key):
        return options, None
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options, channel_credentials(ca, cert, key)


def open_channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to ``target``: TLS when asked for (``tls``, or any of ``ca``/``cert``/``key``), else plaintext."""
    options, credentials = _channel_settings(options, tls, ca, cert, key, server_name)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)
