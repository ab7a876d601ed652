"""Shared test settings for hypothesis.

No deadlines (JIT compiles on first use), and derandomized: each run draws the same examples,
so CI cannot turn red on a case no developer has seen. To explore new cases, run with
``HYPOTHESIS_PROFILE=explore`` (random draws, 200 examples per test).
"""

import os

from hypothesis import HealthCheck, settings

common = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
settings.register_profile("jema", derandomize=True, max_examples=25, **common)
settings.register_profile("explore", max_examples=200, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jema"))
