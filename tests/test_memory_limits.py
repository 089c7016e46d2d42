"""The free memory torchfim checks dense results against: the host's, or less under a cgroup limit (a container's
``--memory``, a pod's limit), the least over the process's cgroup and those above it, each limit less the usage that
cannot be reclaimed. The cgroup trees here are fake ones, written to a temporary folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfim
from torchfim import _memory

MIB = 2**20


def _write(folder, **files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def _v1_tree(tmp_path, limit: int, usage: int, inactive: int):
    """cgroup v1: the memory controller's root unlimited, the pod 512 MiB with 300 used, the container ``limit``."""
    root = tmp_path / "cg" / "memory"
    _write(root, memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes=f"{8 * 2**30}\n",
           memory_stat="cache 0\ntotal_inactive_file 0\n")
    _write(root / "pod", memory_limit_in_bytes=f"{512 * MIB}\n", memory_usage_in_bytes=f"{300 * MIB}\n",
           memory_stat="total_inactive_file 0\n")
    _write(root / "pod" / "ctr", memory_limit_in_bytes=f"{limit}\n", memory_usage_in_bytes=f"{usage}\n",
           memory_stat=f"cache {inactive}\ntotal_inactive_file {inactive}\n")
    (tmp_path / "self_cgroup").write_text("5:cpu,cpuacct:/pod/ctr\n4:memory:/pod/ctr\n0::/\n")
    return tmp_path / "cg", tmp_path / "self_cgroup"


@pytest.fixture
def fake_cgroups(monkeypatch, tmp_path):
    def point(root, proc) -> None:
        monkeypatch.setattr(_memory, "CGROUP_ROOT", root)
        monkeypatch.setattr(_memory, "PROC_CGROUP", proc)
    return point


def test_the_least_room_over_the_cgroup_and_its_parents_counts(tmp_path, fake_cgroups) -> None:
    """Container: 1 GiB − 700 MiB + 100 MiB inactive cache = 424 MiB; its pod: 512 − 300 = 212 MiB, the least."""
    fake_cgroups(*_v1_tree(tmp_path, 2**30, 700 * MIB, 100 * MIB))
    assert _memory.cgroup_free_bytes() == 212 * MIB
    assert _memory.available_bytes(torch.device("cpu")) == min(212 * MIB, _memory._host_available())
    fake_cgroups(*_v1_tree(tmp_path, 2**30, 1000 * MIB, 100 * MIB))  # the container's 124 MiB the least now
    assert _memory.cgroup_free_bytes() == 124 * MIB


def test_cgroup_v2_and_a_namespaced_cgroup_at_the_root(tmp_path, fake_cgroups) -> None:
    """cgroup v2 (``memory.max``, ``memory.current``); a process whose cgroup path is not under the mount (a cgroup
    namespace shows the container's cgroup as the root) reads the root's files."""
    root = tmp_path / "cg"
    _write(root, memory_max=f"{256 * MIB}\n", memory_current=f"{100 * MIB}\n", memory_stat="inactive_file 20971520\n")
    (tmp_path / "self_cgroup").write_text("0::/somewhere/else\n")
    fake_cgroups(root, tmp_path / "self_cgroup")
    assert _memory.cgroup_free_bytes() == 176 * MIB
    _write(root, memory_max="max\n")
    assert _memory.cgroup_free_bytes() is None


def test_no_limit_or_no_cgroup_file_system_leaves_the_hosts_memory(tmp_path, fake_cgroups) -> None:
    fake_cgroups(tmp_path / "none", tmp_path / "missing")
    assert _memory.cgroup_free_bytes() is None
    assert _memory.available_bytes(torch.device("cpu")) == _memory._host_available()


def test_a_dense_result_over_the_containers_limit_is_refused_up_front(tmp_path, fake_cgroups) -> None:
    """A 2000×2000 Fisher with its working copy (tens of MiB) fits the host but not the container's 10 MiB of room
    (a limit of 210 MiB with 200 used). Before, only the host's MemAvailable counted."""
    fake_cgroups(*_v1_tree(tmp_path, 210 * MIB, 200 * MIB, 0))
    model = nn.Linear(199, 10)  # 2,000 parameters
    with pytest.raises(torchfim.TorchfimError, match=r"structure='full' needs a 2000×2000 matrix \(about 30\.5 MiB "
                                                     r"with working memory\) but only 10 MiB is available on cpu; "
                                                     r"the machine has next to no free memory at this call"):
        torchfim.fisher(model, torch.randn(4, 199), structure="full")


def test_sizes_read_in_the_unit_that_shows_them() -> None:
    """A refusal of a 58 KiB matrix on a machine out of memory read "0.0 GiB needed, 0.0 GiB available"."""
    assert [_memory.size_text(g) for g in (2.25, 0.5, 58 / 2**20, 0.0, -0.5)] == ["2.25 GiB", "512 MiB", "58 KiB",
                                                                                  "0 KiB", "0 KiB"]
