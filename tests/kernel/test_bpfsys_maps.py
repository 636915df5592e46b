"""bpfsys's map operations on real maps of the kinds the tracer reads (made with BPF_MAP_CREATE,
no program needed)."""
import ctypes
import os

import pytest

from bpftrace_hostport.ebpf import bpfsys
from tests.conftest import require_kernel

BPF_MAP_TYPE_HASH = 1


@pytest.fixture
def hash_map():
    require_kernel()
    fd = bpfsys.map_create(BPF_MAP_TYPE_HASH, 8, 8, 64, name="t_hash")
    try:
        yield bpfsys.BpfMap("t_hash", fd, ctypes.c_uint64, ctypes.c_uint64)
    finally:
        os.close(fd)


def test_is_empty_follows_the_keys(hash_map):
    assert hash_map.is_empty()
    hash_map.update(ctypes.c_uint64(7), ctypes.c_uint64(1))
    assert not hash_map.is_empty()
    assert hash_map.delete(ctypes.c_uint64(7))
    assert hash_map.is_empty()
