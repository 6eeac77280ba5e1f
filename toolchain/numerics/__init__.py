"""Shared numerics, the lowest layer of the toolchain: nothing here imports another toolchain package.

Import the submodules directly (`from toolchain.numerics.hessian import ...`).
"""
