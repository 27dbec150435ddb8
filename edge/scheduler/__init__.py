"""The DNS scheduler: an authoritative server that sends each client to its nearest healthy edge.

``answer`` decides (pure), ``server`` moves DNS messages over UDP and TCP,
``health`` probes the edges, ``service`` wires them together for
``edge run dns``.  ``geo`` holds the coverage lookup and distances.
"""
