"""`reuse_freed_memory()`: large blocks come from the heap and stay there when freed in the block, and only there."""

import contextlib
import ctypes

import pytest
import torch

from clipcap_hf.utils import memory
from clipcap_hf.utils.memory import reuse_freed_memory, reuses_freed_memory

pytestmark = pytest.mark.skipif(not memory.on_glibc(), reason="sets glibc's malloc switches")
LARGE = 64 * 2**20  # above the 32 MB beyond which glibc maps every block on its own by default


class Mallinfo2(ctypes.Structure):  # glibc's `struct mallinfo2` (malloc.h), all size_t
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@pytest.fixture
def mallinfo2():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = Mallinfo2
    return libc.mallinfo2


@pytest.fixture(autouse=True)
def malloc_left_to_its_defaults(monkeypatch):
    for name in memory.MALLOC_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    memory._glibc.cache_clear()
    yield
    memory._glibc.cache_clear()


def mapped_on_its_own(mallinfo2) -> bool:
    """
    Whether a large tensor gets a memory mapping of its own (and gives it back when freed), as by default. It is made
    larger than all the free memory in the heap (which blocks in earlier tests leave there): glibc maps a block only
    when the heap cannot serve it.
    """
    size = LARGE + mallinfo2().fordblks
    before = mallinfo2().hblkhd
    block = torch.empty(size // 4)
    mapped = mallinfo2().hblkhd - before >= size // 4 * 4
    del block
    return mapped


def test_large_blocks_come_from_the_heap_and_stay_there_in_the_block(mallinfo2):
    assert mapped_on_its_own(mallinfo2)
    with reuse_freed_memory():
        assert reuses_freed_memory()
        free = mallinfo2().fordblks
        assert not mapped_on_its_own(mallinfo2)
        assert mallinfo2().fordblks - free >= LARGE  # freed, and kept in the heap for the next allocation
    assert not reuses_freed_memory()
    assert mapped_on_its_own(mallinfo2)


def test_blocks_nest_and_the_outermost_one_restores(mallinfo2):
    with reuse_freed_memory():
        with reuse_freed_memory():
            pass
        assert reuses_freed_memory()  # the inner block's end leaves the outer one's switches set
        assert not mapped_on_its_own(mallinfo2)
    assert not reuses_freed_memory()
    assert mapped_on_its_own(mallinfo2)


def test_a_process_forked_in_the_block_gets_the_defaults_back(mallinfo2):
    with reuse_freed_memory():
        memory._restore_in_forked_child()  # what the child of a fork runs (os.register_at_fork)
        assert not reuses_freed_memory()
        assert mapped_on_its_own(mallinfo2)
    assert not reuses_freed_memory()
    with reuse_freed_memory():  # the next block sets the switches again
        assert reuses_freed_memory()
        assert not mapped_on_its_own(mallinfo2)


def test_malloc_tuned_by_the_environment_is_left_alone(monkeypatch, mallinfo2):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=4294967295")
    memory._glibc.cache_clear()
    with reuse_freed_memory():
        assert not reuses_freed_memory()
        assert mapped_on_its_own(mallinfo2)


class DeviceAwareLinear(torch.nn.Linear):
    """A layer with the `device` and `dtype` that transformers models have, which a captioning run reads."""

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def test_a_captioning_run_on_the_cpu_reuses_freed_memory_until_the_packed_copies_are_freed(monkeypatch):
    from clipcap_hf.inference import captioner, captioning_run

    kernels_ended_reusing = []
    packing_block = captioner.cpu_linear_kernels

    @contextlib.contextmanager
    def watched_packing_block(model, prepack):
        with packing_block(model, prepack=prepack):
            yield
        kernels_ended_reusing.append(reuses_freed_memory())

    monkeypatch.setattr(captioner, "cpu_linear_kernels", watched_packing_block)
    with torch.no_grad(), captioning_run(DeviceAwareLinear(4, 4)):
        assert reuses_freed_memory()
    # The packed copies are freed while freed memory is still kept: the heap is handed back after them.
    assert kernels_ended_reusing == [True]
    assert not reuses_freed_memory()


def test_a_captioning_run_off_the_cpu_leaves_malloc_alone():
    from clipcap_hf.inference import captioning_run

    with captioning_run(DeviceAwareLinear(4, 4, device="meta")):
        assert not reuses_freed_memory()
