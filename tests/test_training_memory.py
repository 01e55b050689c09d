"""`reuse_freed_memory()`: large freed tensors are reused without page faults in the block, and only there."""

import mmap
import platform
import resource

import pytest
import torch

from clipcap_hf.training.memory import reuse_freed_memory, reuses_freed_memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc switches"
)
LARGE = 64 * 2**20  # above the 32 MB beyond which glibc maps every block afresh by default


def page_faults_of_a_reallocation() -> int:
    """Page faults of writing a freshly allocated large tensor, right after one of the same size was freed."""
    torch.empty(LARGE // 4).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(LARGE // 4).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_in_the_block_and_handed_back_after_it():
    pages = LARGE // mmap.PAGESIZE
    assert page_faults_of_a_reallocation() > 0.9 * pages  # glibc's default: mapped, faulted in, unmapped each time
    with reuse_freed_memory():
        assert reuses_freed_memory()
        page_faults_of_a_reallocation()  # grows the heap once
        assert page_faults_of_a_reallocation() < 0.05 * pages
    assert not reuses_freed_memory()
    assert page_faults_of_a_reallocation() > 0.9 * pages


def test_blocks_nest_and_the_outermost_one_restores():
    pages = LARGE // mmap.PAGESIZE
    with reuse_freed_memory():
        with reuse_freed_memory():
            page_faults_of_a_reallocation()
        assert reuses_freed_memory()  # the inner block's end leaves the outer one's switches set
        assert page_faults_of_a_reallocation() < 0.05 * pages
    assert not reuses_freed_memory()
