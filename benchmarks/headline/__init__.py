"""The headline comparison (``python -m benchmarks bench``): the runner (``bench``), the
single-process peers (``peers``), torch's pipelining peer (``torchpipe``), memory read-outs
(``memory``), the scaling model (``scaling``), the derived figures (``analysis``) and the
markdown and plot (``report``)."""
