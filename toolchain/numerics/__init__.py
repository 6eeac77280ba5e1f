"""Shared numerics, the lowest layer: N:M validity (`nm`), the supported code widths (`widths`) and array
geometry (`geometry`). Import the submodules directly; this package re-exports nothing."""
