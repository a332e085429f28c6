"""Hypothesis profiles: `make test` is reproducible, exploring is one flag away.

The property tests draw their examples from a fixed seed by default ("repeatable"), so a CI run
and its rerun test the same inputs and a failure is never a coin toss. Explore new inputs with
`pytest --hypothesis-profile=explore` (random seeds, more examples); pin what it finds with
`@example`, as tests/unit/test_compression.py does.
"""

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("repeatable")
