"""The benchmark scripts (run each as ``python benchmarks/<script>.py``); a package, so that the
tests can import the statistics they share (``benchmarks.paired_stats``)."""
