"""A module that registers nothing (tests/test_config_safety.py)."""


class Thing:
    def __init__(self, **kw):
        self.kw = kw
