"""The local stand-in's command line, and a helper to see who listens where. The stand-in itself is
brought up, used and taken down by tests/test_job_submit.py (loopback only, token auth, full cleanup)."""

from __future__ import annotations

import socket
from pathlib import Path

from cluster.local_standin import main


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                ipv4 = len(addr) == 8
                out.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]) if ipv4 else addr)
    return out


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_down_without_a_standin_says_so(tmp_path, capsys):
    assert main(["down", "--dir", str(tmp_path)]) == 1
    assert "no stand-in recorded" in capsys.readouterr().err
