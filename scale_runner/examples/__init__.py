"""Small, dependency-free example components used by the configs in ``configs/``."""
