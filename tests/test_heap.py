"""tsugiki.heap: the malloc settings around a model load."""

import pytest

from tsugiki import heap


class RecordingLibc:
    """Stands in for glibc and records the calls made to it."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


STEADY = [("mallopt", heap.M_MMAP_THRESHOLD, heap.STEADY_MMAP_THRESHOLD),
          ("mallopt", heap.M_TRIM_THRESHOLD, heap.STEADY_TRIM_THRESHOLD),
          ("malloc_trim", 0)]
LOW = ("mallopt", heap.M_MMAP_THRESHOLD, heap.LOAD_MMAP_THRESHOLD)


@pytest.fixture
def libc(monkeypatch):
    fake = RecordingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    for name in heap._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return fake


def test_loading_lowers_the_threshold_then_fixes_it_and_trims(libc):
    with heap.loading():
        assert libc.calls == [LOW]
    assert libc.calls == [LOW] + STEADY


def test_nested_loads_act_as_one(libc):
    with heap.loading():
        with heap.loading():
            pass
        assert libc.calls == [LOW]  # the inner exit keeps the low threshold for the rest of the outer load
    assert libc.calls == [LOW] + STEADY
    assert heap._depth[0] == 0


def test_an_error_in_the_load_still_restores_the_steady_settings(libc):
    with pytest.raises(OSError, match="bad checkpoint"):
        with heap.loading():
            raise OSError("bad checkpoint")
    assert libc.calls == [LOW] + STEADY
    assert heap._depth[0] == 0


@pytest.mark.parametrize("setting", heap._USER_SETTINGS)
def test_the_users_malloc_settings_win(libc, monkeypatch, setting):
    monkeypatch.setenv(setting, "1048576")
    assert not heap.tunable()
    with heap.loading():
        pass
    assert libc.calls == []


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert not heap.tunable()
    assert heap.release_free_memory() is False
    with heap.loading():
        pass


def test_real_glibc_accepts_the_settings():
    libc = heap._glibc()
    if libc is None:
        pytest.skip("not glibc")
    # mallopt returns 1 when it accepts a value, 0 when it rejects one.
    assert libc.mallopt(heap.M_MMAP_THRESHOLD, heap.STEADY_MMAP_THRESHOLD) == 1
    assert libc.mallopt(heap.M_TRIM_THRESHOLD, heap.STEADY_TRIM_THRESHOLD) == 1
    assert libc.mallopt(heap.M_MMAP_THRESHOLD, heap.LOAD_MMAP_THRESHOLD) == 1
    assert libc.mallopt(heap.M_MMAP_THRESHOLD, heap.STEADY_MMAP_THRESHOLD) == 1
    assert isinstance(heap.release_free_memory(), bool)


def test_load_model_runs_inside_loading(monkeypatch):
    """The thresholds are low while the model is built and steady once load_model returns."""
    import torch

    from tsugiki import models

    fake = RecordingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    for name in heap._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: seen.append(list(fake.calls)) or self)
    models.load_model(model, dtype=torch.float32)
    assert seen == [[LOW]]
    assert fake.calls == [LOW] + STEADY
