"""Corpus kinds, one module each; :mod:`drrl_env.data` registers them by import path."""
