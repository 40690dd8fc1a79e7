"""tunelab.memory: what the process holds, measured from the kernel's own counters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Allocate 8 MiB tensors after a 16 MiB free has raised glibc's mmap threshold, then free
# every other one: the freed chunks sit between live ones, where the heap cannot shrink, and
# stay resident unless return_freed_memory() ran first (then each was its own mapping).
_CHURN = textwrap.dedent("""
    import sys
    import torch
    from tunelab.memory import return_freed_memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    if sys.argv[1] == "on":
        assert return_freed_memory()
    big = torch.ones(4 << 20)
    del big  # glibc (dynamic threshold) now serves blocks up to 16 MiB from the heap
    blocks = [torch.ones(2 << 20) for _ in range(24)]
    before = rss_mib()
    del blocks[::2]
    print(before - rss_mib())  # MiB given back by the frees
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_return_freed_memory_gives_freed_blocks_back():
    def returned_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], check=True,
                             capture_output=True, text=True).stdout
        return float(out.split()[-1])

    # 96 MiB freed: the heap keeps it; with return_freed_memory() it goes back at once
    assert returned_mib("default") < 10
    assert returned_mib("on") > 80
