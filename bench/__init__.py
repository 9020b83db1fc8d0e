"""Side-by-side benchmarks of bunmyaku against ``transformers`` on the same machine, in the same run."""
