"""Hostfiles for a federated simulation over several machines (``scripts/launch_fl.py``).

MPICH's ``mpirun`` (hydra) reads a hostfile of ``host[:processes]`` lines and starts the ranks on
other hosts over ssh. A host it cannot resolve or reach fails late and noisily: rank 0 may already
have started (and written to LOGDIR) while hydra prints a page of proxy errors, or, for an address
that drops packets, hangs until ssh gives up. :func:`check_hosts` checks every host of the file
before anything starts: the name resolves, and a host that is not this machine answers on the ssh
port within a timeout; the first failure is one line naming the file, the line and the host.

The ranks of one MPI job exchange pickled objects (``mpi4py.futures``): run across hosts only on a
trusted private network (docs/threat-model.md).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from fedrec.errors import ConfigError

SSH_PORT = 22  # hydra's default launcher (bootstrap) is ssh
CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class HostEntry:
    """One line of a hostfile: a host name (or address) and how many ranks it takes."""

    name: str
    processes: int
    line: int


def parse_hostfile(path: str) -> list[HostEntry]:
    """Read an MPICH hostfile: ``host`` or ``host:N`` per line, ``#`` comments, blank lines ignored.

    Raises:
        ConfigError: the file is missing or empty, or a line's process count is not a positive integer.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ConfigError(f"hostfile {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"hostfile {path}: not a text file") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host = line.split()[0]  # hydra allows options after the host (e.g. ifhn=...); they pass through
        name, _, count = host.partition(":")
        if not name:
            raise ConfigError(f"hostfile {path} line {number}: {raw.strip()!r} names no host")
        processes = 1
        if count:
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(
                    f"hostfile {path} line {number}: {host!r}: the process count after ':' must be a "
                    "positive integer"
                )
            processes = int(count)
        entries.append(HostEntry(name=name, processes=processes, line=number))
    if not entries:
        raise ConfigError(f"hostfile {path}: names no host (expected lines like 'node1:2')")
    return entries


def _addresses(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def local_addresses() -> set[str]:
    """Addresses this machine answers to under its own names (loopback ones are local anyway)."""
    found: set[str] = set()
    for name in {socket.gethostname(), socket.getfqdn()}:
        try:
            found.update(_addresses(name))
        except OSError:
            continue
    return found


def is_local(name: str, addresses: list[str], own: set[str]) -> bool:
    """Whether hydra would start this host's ranks here (no ssh): this machine's name or address."""
    if name in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    return all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback or a in own for a in addresses)


def check_reachable(address: str, port: int, timeout: float) -> str | None:
    """None when ``address:port`` accepts a TCP connection within ``timeout`` seconds, else why not."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err)


def check_hosts(
    path: str,
    entries: list[HostEntry],
    *,
    port: int = SSH_PORT,
    timeout: float = CONNECT_TIMEOUT_SECONDS,
) -> list[str]:
    """Check every host of a parsed hostfile; returns the names of the hosts that are not this machine.

    Raises:
        ConfigError: one line naming the hostfile, the line and the host that does not resolve or
            does not answer on ``port`` (hydra starts remote ranks over ssh).
    """
    own = local_addresses()
    remote: list[str] = []
    checked: dict[str, str | None] = {}
    for entry in entries:
        if entry.name in checked:
            continue
        try:
            addresses = _addresses(entry.name)
        except OSError as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise ConfigError(
                f"hostfile {path} line {entry.line}: host {entry.name!r} does not resolve ({reason})"
            ) from None
        if is_local(entry.name, addresses, own):
            checked[entry.name] = None
            continue
        failure = None
        for address in addresses:
            failure = check_reachable(address, port, timeout)
            if failure is None:
                break
        checked[entry.name] = failure
        if failure is not None:
            raise ConfigError(
                f"hostfile {path} line {entry.line}: host {entry.name!r} ({', '.join(addresses)}) is not "
                f"reachable on port {port} (ssh, how mpirun starts remote ranks): {failure}"
            )
        remote.append(entry.name)
    return remote


def mpirun_command(
    mpirun: str, hostfile: str, processes: int, python: str, script: str, script_args: list[str]
) -> list[str]:
    """The hydra command line that runs ``script`` as an ``mpi4py.futures`` job over the hostfile."""
    launcher = [mpirun, "-f", os.path.abspath(hostfile), "-np", str(processes)]
    return [*launcher, python, "-m", "mpi4py.futures", script, *script_args]
