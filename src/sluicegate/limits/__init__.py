"""Token and request limits: TPM, RPM and calendar token quotas per counter key.

The pipeline builds :class:`LimitRequest` values from a :class:`LimitPolicy` and a token
estimate, calls :meth:`Limiter.admit` on arrival and :meth:`Limiter.settle` or
:meth:`Limiter.release` when the response ends. Counters live in a
:class:`~sluicegate.limits.memory.MemoryStore` (embedded mode) or a
:class:`~sluicegate.limits.redis_store.RedisStore` (cluster mode). See ``docs/limits.md``.
"""

from sluicegate.limits.admission import Admission, LimitStatus, Reservation
from sluicegate.limits.ceiling import CeilingDecision, apply_max_tokens_ceiling
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.policy import LimitPolicy, merge, resolve_counter_key, tokens_to_reserve
from sluicegate.limits.store import CounterStore, StoreUnavailable

__all__ = [
    "Admission",
    "CeilingDecision",
    "CounterStore",
    "LimitPolicy",
    "LimitRequest",
    "LimitStatus",
    "Limiter",
    "MemoryStore",
    "Reservation",
    "StoreUnavailable",
    "apply_max_tokens_ceiling",
    "merge",
    "resolve_counter_key",
    "tokens_to_reserve",
]
