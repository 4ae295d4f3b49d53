"""stages/runtime.py: launcher ranks, precision, seeded construction, and loaders whose workers'
user errors arrive as themselves."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError, DatasetError
from stages.runtime import Launch, Loader, autocast, seeded


class Scans(torch.utils.data.Dataset):
    """Item 2 is a damaged file (a user error); item 3 a bug."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 2:
            raise DatasetError("/data/scan-2.bin", "size 13 bytes is not a multiple of the 16-byte record")
        if i == 3:
            raise ZeroDivisionError("a bug")
        return i


@pytest.mark.parametrize("workers", [0, 1])
def test_a_workers_user_error_arrives_as_itself(workers):
    loader = Loader(Scans(), list, batch_size=1, num_workers=workers, sampler=[0, 1, 2])
    with pytest.raises(DatasetError) as err:
        list(loader)
    assert str(err.value) == "/data/scan-2.bin: size 13 bytes is not a multiple of the 16-byte record"
    assert err.value.path == "/data/scan-2.bin"


def test_a_workers_bug_is_not_turned_into_a_user_error():
    loader = Loader(Scans(), list, batch_size=1, num_workers=1, sampler=[3])
    with pytest.raises(ZeroDivisionError):  # torch re-raises a worker's exception with its traceback
        list(loader)


def test_batches_pass_through():
    assert list(Loader(Scans(), list, batch_size=2, num_workers=0, sampler=[0, 1])) == [[0, 1]]


def test_seeded_builds_the_same_model_and_restores_the_callers_state():
    before = torch.get_rng_state()
    with seeded(3):
        a = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(before, torch.get_rng_state())
    with seeded(3):
        b = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b)


def test_launch_comes_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Launch.from_env() == Launch(1, 2, 1)
    assert Launch.from_env(rank=0) == Launch(0, 2, 1)
    with pytest.raises(ConfigError, match=r"rank 2 is not in \[0, 2\)"):
        Launch.from_env(rank=2)


def test_precision_names():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        autocast(torch.device("cpu"), "fp8")
