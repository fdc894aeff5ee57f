"""Plumbing shared by the two jobs (training in `model/`, geography and inference in `pipeline/`): one-line user
errors, atomic output files and locks, joining or starting Ray with one bounded task loop, layered YAML
config files. It imports neither of them.
"""
