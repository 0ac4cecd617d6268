"""Benchmarks shipped with the package: `sslmed bench loader|step|scaling|pack|register|residual [--quick]`.

Each module has `main(argv)`, prints a table, appends JSON lines to `benchmarks/results/` under the
current directory (or `--results DIR`) and ends with one line of `key=value` pairs.
"""

BENCHMARKS = ("loader", "step", "scaling", "pack", "register", "residual")
