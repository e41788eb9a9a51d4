"""Eviction policies of the worker caches, and their registry.

A policy decides which cached rows of a full table make room for this
iteration's misses.  The directory keeps, for every slot, ``last_use`` (the
iteration it was last used in) and ``freq`` (its uses since it was placed) for
every policy (:class:`~torchrec_esd.cache.slots.WorkerSlots`); a policy orders
the eviction candidates from them and from any per-slot state of its own
(:meth:`EvictionPolicy.slot_state`, :meth:`EvictionPolicy.on_place`).

The directory is replicated on every worker rank and must stay identical, so a
policy must be a deterministic function of the cache state: no randomness, no
wall clock, no dependence on anything but the slots' metadata.

A policy with a ``kernel_code`` runs in the C++ cache step
(``ops.plan_worker_cache``, which switches on :class:`KernelPolicy`); any other
runs on the PyTorch reference path of the directory, which gives the same
plans, only slower.  A new policy is a subclass registered with
:func:`register_policy`; ``EsdConfig.cache_policy`` then accepts its name::

    @register_policy
    class FifoPolicy(EvictionPolicy):
        name = "fifo"
        def slot_state(self, num_slots):
            return {"placed": torch.zeros(num_slots, dtype=torch.int64)}
        def on_place(self, slots, iteration):
            ...
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar, Dict, Optional, Tuple, Type

import torch

from torchrec_esd import config as _config
from torchrec_esd.cache.slots import WorkerSlots
from torchrec_esd.config import EsdConfigError


class KernelPolicy(IntEnum):
    """Eviction orders the C++ cache step implements (csrc/cpu/plan_cpu.cpp
    mirrors these values)."""

    LRU = 0
    LFU = 1


class EvictionPolicy:
    """Base class of eviction policies (see the module docstring).

    Subclasses set ``name`` (the ``EsdConfig.cache_policy`` string) and
    implement :meth:`priority`; ``kernel_code`` is a :class:`KernelPolicy`
    for an order the C++ cache step implements, else ``None``."""

    name: ClassVar[str] = ""
    kernel_code: ClassVar[Optional[KernelPolicy]] = None
    # True: the directory hands the policy the upcoming batches' rows before
    # each iteration (:meth:`look_ahead`; :mod:`torchrec_esd.cache.lookahead`)
    reads_upcoming: ClassVar[bool] = False

    def slot_state(self, num_slots: int) -> Dict[str, torch.Tensor]:
        """Per-slot tensors of this policy's own for a worker with ``num_slots``
        slots (kept in ``WorkerSlots.policy_state``); none by default."""
        return {}

    def on_place(self, cache: WorkerSlots, slots: torch.Tensor, iteration: int) -> None:
        """Rows were placed into ``slots`` (in the ascending order of their
        row keys) during ``iteration``, before they are used."""

    def look_ahead(self, upcoming) -> None:
        """The rows the next batches use (an
        :class:`~torchrec_esd.cache.lookahead.UpcomingUse`), before the
        directory plans an iteration; only called where ``reads_upcoming``."""

    def priority(self, cache: WorkerSlots, slots: torch.Tensor) -> torch.Tensor:
        """Eviction priority (int64) of the cached, unpinned ``slots`` of one
        worker: per table, the lowest priorities are evicted first, ties in
        slot order."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kernel_code={self.kernel_code!r})"


class LruPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"
    kernel_code = KernelPolicy.LRU

    def priority(self, cache: WorkerSlots, slots: torch.Tensor) -> torch.Tensor:
        return cache.last_use[slots]


class LfuPolicy(EvictionPolicy):
    """Least frequently used (since placed) first, then least recently used."""

    name = "lfu"
    kernel_code = KernelPolicy.LFU

    def priority(self, cache: WorkerSlots, slots: torch.Tensor) -> torch.Tensor:
        return cache.freq[slots] * (1 << 32) + cache.last_use[slots]


_REGISTRY: Dict[str, Type[EvictionPolicy]] = {}
_BUILTIN = ("lru", "lfu", "lookahead")  # lookahead: registered by cache/lookahead.py


def _publish() -> None:
    # EsdConfig validates cache_policy against config.CACHE_POLICIES; config
    # cannot import this module (this module imports config), so the names
    # are handed to it here whenever the registry changes.
    _config.CACHE_POLICIES = tuple(_REGISTRY)


def register_policy(cls: Type[EvictionPolicy]) -> Type[EvictionPolicy]:
    """Register an :class:`EvictionPolicy` subclass under ``cls.name`` (usable
    as a class decorator).  Re-registering the same class is a no-op."""
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise EsdConfigError(f"register_policy takes an EvictionPolicy subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name:
        raise EsdConfigError(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise EsdConfigError(f"cache policy {name!r} is already registered ({_REGISTRY[name].__name__})")
    code = cls.kernel_code
    if code is not None:
        if code not in tuple(KernelPolicy):
            raise EsdConfigError(
                f"{cls.__name__}.kernel_code {code!r} is not one the C++ cache step implements"
                f" ({[int(c) for c in KernelPolicy]}); use None to run on the reference path"
            )
        taken = [c.__name__ for n, c in _REGISTRY.items() if n != name and c.kernel_code == code]
        if taken:
            raise EsdConfigError(f"{cls.__name__}.kernel_code {int(code)} is already the code of {taken[0]}")
    _REGISTRY[name] = cls
    _publish()
    return cls


def unregister_policy(name: str) -> None:
    """Remove a user-registered policy (the built-in ones stay)."""
    if name in _BUILTIN:
        raise EsdConfigError(f"the built-in cache policy {name!r} cannot be unregistered")
    if _REGISTRY.pop(name, None) is None:
        raise EsdConfigError(f"cache policy {name!r} is not registered (known: {policy_names()})")
    _publish()


def policy_names() -> Tuple[str, ...]:
    """Names ``EsdConfig.cache_policy`` accepts."""
    return tuple(_REGISTRY)


def make_policy(name: str) -> EvictionPolicy:
    """A fresh instance of the policy registered as ``name``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise EsdConfigError(
            f"unknown cache_policy {name!r}; known policies: {policy_names()} (a new one is an"
            " EvictionPolicy subclass registered with torchrec_esd.cache.register_policy)"
        )
    return cls()


register_policy(LruPolicy)
register_policy(LfuPolicy)
