"""The tools corner: benchmarks that measure the product through its public calls, and their yardsticks.

- ``runtimes``: per-step time of every runtime and transport side by side (``raydistill bench``,
  ``python -m raydistill.bench``);
- ``reference_loop``: a plain PyTorch loop, every peer in one process, eager (the yardstick of ``--gpu`` and
  ``--reference``; ``python -m raydistill.bench.reference_loop``).
"""
