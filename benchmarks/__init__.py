"""pipelocal's benchmarks, one package: ``python -m benchmarks NAME [args]`` from the repository
root (``python -m benchmarks --help`` lists them). Each writes one JSON file to
``benchmarks/results/`` (see ``benchmarks/README.md``); the numbers are quoted in
``docs/benchmarks.md``."""
