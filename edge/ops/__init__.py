"""Operating the whole CDN from one command line: purge, preload, inspect, status.

Each command reads the topology, talks to every node's admin listener (or,
for preload, its traffic port) and prints one table; a node that fails is
named with its address and the error, and the command exits non-zero.
The admin token comes from ``--token-file``, ``$EDGE_ADMIN_TOKEN`` or the
file named by ``$EDGE_ADMIN_TOKEN_FILE``.
"""
