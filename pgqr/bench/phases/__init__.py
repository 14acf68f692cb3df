"""`pgqr bench`'s phases, one module each; pgqr.bench.run calls them in order. A phase takes the shared Bench
and adds its figures to bench.report."""
