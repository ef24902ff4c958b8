"""Benchmark runners behind ``hessdiff bench``: experiment harness, not library code.

* :mod:`~hessdiff.scripts.bench.gmm` -- base solvers on exact Gaussian(-mixture) priors
  (``hessdiff bench gmm-prior``);
* :mod:`~hessdiff.scripts.bench.lml` -- LML corrections on the same priors and on the embedded
  models (``hessdiff bench lml``);
* :mod:`~hessdiff.scripts.bench.posterior` -- DPS, latent DPS, PSLD and STSL on grid-GMM posteriors
  (``hessdiff bench posterior``).

The command-line options live in :mod:`hessdiff.scripts.cmd_bench` and
:mod:`hessdiff.scripts.cmd_bench_lml`.
"""
