"""Workers keep freed heap memory (``raymoe.runtime.host_memory``): on glibc the thresholds are taken."""

from __future__ import annotations

import platform

import pytest

from raymoe.runtime.host_memory import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_glibc_takes_the_thresholds():
    assert keep_freed_memory() is True
