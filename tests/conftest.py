"""Shared test settings: hypothesis without deadlines (JIT compiles on first use)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "jema",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile("jema")
