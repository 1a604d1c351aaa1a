"""Pure decision functions: no I/O, no sleeping, `now` is always an argument."""
