"""Loaded by every Python process of the tests' smoke chain (tests/conftest.py puts this folder on PYTHONPATH):
each name lookup of a host other than this machine is written to $BIRBAL_NET_PROBE_LOG and refused, as on a
machine without a network. The tiny profile reads local files only; tests/test_smoke_chain.py asserts the log is
empty, so a library that starts fetching (a hub kernel at import, a telemetry call) fails the suite here, even
where the network would have answered."""

import os
import socket
import sys

_LOG = os.environ.get("BIRBAL_NET_PROBE_LOG")
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0"}

if _LOG:
    _getaddrinfo = socket.getaddrinfo

    def _refuse_remote(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name in _LOCAL:
            return _getaddrinfo(host, *args, **kwargs)
        with open(_LOG, "a") as log:
            log.write(f"{name}\t{' '.join(sys.argv)[:200]}\n")
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: refused by tests/netprobe")

    socket.getaddrinfo = _refuse_remote
