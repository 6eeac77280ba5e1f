"""Shared numerics, the lowest layer: nothing here imports another toolchain package. The layer Hessian's
preparation and solves (`hessian`), N:M validity (`nm`), the supported code widths (`widths`) and array geometry
(`geometry`). Import the submodules directly; this package re-exports nothing."""
