"""What `edge run` would refuse beyond the file itself, found by `edge check` first.

``config.parse`` validates the file; a process can still refuse a valid
file when it starts: the DNS scheduler will not hand out an L1 on a wildcard
address, a cache directory that is a file cannot be created, an origin's
content directory cannot be a file, an access log under a file cannot be opened.
:func:`problems` runs those same rules without starting anything, so
`edge check` (and `edge up`, before it starts or reloads anything) reports
them as config errors naming the file, the key and the problem.

Paths are checked on the machine this runs on: run `edge check` on each host
of a topology spread over several.  Only what is certain to fail is
reported: a directory that does not exist here is fine (it may be created,
or exist on the node's own host), one that is a file or sits under a file
is not.
"""

from __future__ import annotations

from pathlib import Path

from edge.config import ConfigError, Topology


def problems(topology: Topology, only: str | None = None) -> list[ConfigError]:
    """Every problem found, in topology order; empty when every process would start.

    With `only` (a node name, or "dns"), just that process's: what a reload
    of it checks, without judging other hosts' paths on this one.
    """
    found: list[ConfigError] = []
    if topology.dns is not None and only in (None, "dns"):
        # The scheduler's own construction is the rule (a wildcard L1 address, for one):
        # building it here means `edge check` can never disagree with `edge run dns`.
        from edge.scheduler.answer import Answerer
        try:
            Answerer(topology)
        except ConfigError as exc:
            found.append(exc)
    for node in topology.nodes:
        if only is not None and node.name != only:
            continue
        path = f"nodes.{node.name}"
        if node.role == "origin":
            problem = _directory_problem(node.content_dir) if node.content_dir is not None else None
            if problem:
                found.append(ConfigError(topology.source, f"{path}.content_dir",
                                         f"the origin serves files from it: {problem}"))
            continue
        problem = _directory_problem(topology.cache_dir(node))
        if problem:
            key = f"{path}.cache_dir" if node.cache_dir is not None else "state_dir"
            found.append(ConfigError(topology.source, key, f"cache directory of {node.name}: {problem}"))
        if node.access_log not in ("-", "off"):
            log_file = Path(node.access_log)
            problem = ("is a directory" if log_file.is_dir() else _directory_problem(log_file.parent))
            if problem:
                found.append(ConfigError(topology.source, f"{path}.access_log",
                                         f"{str(log_file)!r}: {problem}"))
    return found


def _directory_problem(directory: Path) -> str | None:
    """Why `directory` can never be a directory (it or an ancestor is a file); None if it can."""
    for candidate in (directory, *directory.parents):
        if candidate.is_dir():
            return None
        if candidate.exists():
            where = "is a file" if candidate == directory else f"is under {str(candidate)!r}, which is a file"
            return f"{str(directory)!r} {where}, not a directory"
    return None
