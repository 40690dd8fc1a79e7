"""Bind-address checks shared by ``tunelab serve`` and ``tunelab ui``."""

from __future__ import annotations

import ipaddress

from tunelab.errors import TunelabError


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise TunelabError(f"--port must be between 1 and 65535, got {port}")
    return port
