"""The public names of ``flame`` are pinned: nothing leaks out or vanishes by accident."""

from __future__ import annotations

import inspect

import pytest

import flame

PUBLIC = {
    "Backend",
    "BootError",
    "CallTimeout",
    "Child",
    "ChildEnded",
    "DockerBackend",
    "FlameError",
    "FlyBackend",
    "KubernetesBackend",
    "LocalBackend",
    "Parent",
    "Pool",
    "PoolClosed",
    "PoolNotFound",
    "PoolStats",
    "ProcessBackend",
    "RemoteError",
    "RemoteTraceback",
    "RunnerHandle",
    "RunnerLaunch",
    "RunnerLost",
    "SerializationError",
    "__version__",
    "acall",
    "aplace_child",
    "call",
    "cast",
    "configure",
    "parent",
    "place_child",
}


def test_all_is_pinned() -> None:
    assert set(flame.__all__) == PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    obj = getattr(flame, name)
    if name != "__version__":
        assert inspect.getdoc(obj), f"flame.{name} has no docstring"


def test_error_tree() -> None:
    for name in (
        "CallTimeout",
        "BootError",
        "RunnerLost",
        "SerializationError",
        "PoolNotFound",
        "PoolClosed",
        "ChildEnded",
        "RemoteError",
    ):
        assert issubclass(getattr(flame, name), flame.FlameError), name
    assert issubclass(flame.CallTimeout, TimeoutError)
    assert issubclass(flame.PoolNotFound, LookupError)


def test_call_signatures_match_the_spec() -> None:
    params = inspect.signature(flame.call).parameters
    assert [p.kind for p in params.values()][:2] == [inspect.Parameter.POSITIONAL_ONLY] * 2
    assert params["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["link"].default is True
    pool_params = inspect.signature(flame.Pool).parameters
    for option in (
        "max",
        "min",
        "max_concurrency",
        "backend",
        "timeout",
        "boot_timeout",
        "shutdown_timeout",
        "idle_shutdown_after",
        "min_idle_shutdown_after",
        "single_use",
        "on_grow_start",
        "on_grow_end",
        "on_shrink",
        "log",
    ):
        assert pool_params[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    assert pool_params["min"].default == 0
    assert pool_params["max_concurrency"].default == 100
    assert pool_params["idle_shutdown_after"].default == 30.0
    assert pool_params["min_idle_shutdown_after"].default is None
