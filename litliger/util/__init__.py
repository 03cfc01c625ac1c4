"""Helpers any layer may use: plain Python, importing nothing else of litliger (and no torch).

checks.py   value checks that fail with one line naming the flag (``check_positive`` ...)
"""
