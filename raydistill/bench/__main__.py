"""python -m raydistill.bench: the same as `raydistill bench`."""
from raydistill.bench.runtimes import main

if __name__ == "__main__":
    raise SystemExit(main())
