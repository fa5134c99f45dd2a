"""Redis-backed trajectory store for dreamr-stream (replicas share one cache and one log)."""

from dreamr_redis.store import RedisTrajectoryStore

__all__ = ["RedisTrajectoryStore"]
