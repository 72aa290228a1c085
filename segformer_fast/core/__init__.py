"""The bottom room, what every other room may use: dtypes, devices and kernel limits (``runtime``), the tolerance
rule and TF32 off (``numerics``), atomic files and image reading (``fileio``), glibc malloc thresholds for CPU
inference (``malloc_tuning``).

Imports from the project: nothing.
"""
