"""The CPU allocator of placer's processes keeps freed memory for reuse (graphs.cpu_allocator)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting is glibc's mallopt")

# A training step of three 512-channel 3x3 convolutions on 2x2 maps (ResNet-50's last stage in
# small): gradients freed by set_to_none, allocated again by the next backward. Prints the minor
# page faults of each step after the first.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "retain":
        from graphs.cpu_allocator import retain_freed_memory
        assert retain_freed_memory()
    net = torch.nn.Sequential(*[torch.nn.Conv2d(512, 512, 3, padding=1) for _ in range(3)])
    x = torch.randn(8, 512, 2, 2)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for p in net.parameters():
            p.grad = None
        net(x).sum().backward()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(max(faults[1:]))
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


@glibc
def test_a_retaining_process_reuses_freed_buffers_without_page_faults():
    # glibc's defaults fault the three 9 MiB gradients in again on every step (~9,200 pages of
    # 4 KiB, measured); retained, the steps after the first reuse the same pages.
    assert _faults("default") > 2304
    assert _faults("retain") < 100


def test_retain_freed_memory_is_idempotent():
    from graphs.cpu_allocator import retain_freed_memory

    first = retain_freed_memory()
    assert retain_freed_memory() is first
