"""``pipeline probe``: measure a host's compute speed and the links between hosts, and write them into a cluster file.

- :mod:`pipeline.probe.measure`: the arithmetic (steady-state rates, round trips, rounding), no sockets;
- :mod:`pipeline.probe.link`: the ZeroMQ peer (``probe serve``) and the link measurement (``probe link``);
- :mod:`pipeline.probe.speed`: a short compiled run of a reference model (``probe speed``);
- :mod:`pipeline.probe.update`: writing a measured speed or link into a cluster file, keeping the rest;
- :mod:`pipeline.probe.command`: the command line.

See docs/MULTIHOST.md, "Measuring your hosts and links".
"""
