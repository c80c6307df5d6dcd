"""Split a Keras 3 model into shards and serve them as a ZeroMQ pipeline.

The package is laid out by layer of the system:

- ``pipeline.partition``: graph walking, cost model, cut planning, shard files;
- ``pipeline.wire``: the protobuf envelope and the ZeroMQ multipart codec;
- ``pipeline.serving``: shard workers, join buffers, the KServe v2 ingress;
- ``pipeline.topology``: the topology directory contract shared by all of them.
"""

__version__ = "0.1.0"
