"""Security tooling around the pipeline: ``pipeline keys`` (CURVE key pairs) and TLS for the gRPC ingress.

The CURVE set-up of the ZeroMQ sockets themselves lives with the wire layer,
in :mod:`pipeline.wire.security`.
"""
