"""Serving adapters that use emu3_rt (nothing in emu3_rt imports them back): `runtime.serve` is the HTTP service
on Ray Serve."""
