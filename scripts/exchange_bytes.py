"""Bytes a worker receives per training step from the other peers: the per-step exchange of outputs against
codistillation's exchange of weights every k steps. Measured on the arrays the workers send (one real forward of
each peer, and ``weights_of`` each peer), for a run config with its overrides:

    python scripts/exchange_bytes.py dml-cifar10 --set model.arch=cnn_small --every 10,35
"""
from __future__ import annotations

import argparse

from raydistill.config import load_config
from raydistill.engine.codistill import weights_of
from raydistill.engine.data import load_run_data
from raydistill.engine.peer import Peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--every", default="10", help="exchange intervals k, comma-separated")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides + ["resources.gpus_per_peer=0"])
    spec, arrays = load_run_data(config)
    peers = [Peer(i, config, arrays, spec) for i in range(config.num_peers)]
    outputs = [sum(a.nbytes for a in p.forward(0, 0).values()) for p in peers]
    weights = [sum(a.nbytes for a in weights_of(p).values()) for p in peers]
    # what one peer's worker receives: every other peer's payload (a worker hosting one peer)
    others = lambda sizes, i: sum(s for j, s in enumerate(sizes) if j != i)          # noqa: E731
    per_step = max(others(outputs, i) for i in range(len(peers)))
    print(f"{config.num_peers} peers {config.peers[0].arch}, batch {config.train.batch_size}, method "
          f"{config.method.name}: outputs {outputs[0]:,} B per peer per step; weights {weights[0]:,} B per peer")
    print(f"per-step exchange of outputs: {per_step:,} B received per step")
    for k in (int(v) for v in args.every.split(",")):
        received = max(others(weights, i) for i in range(len(peers)))
        print(f"codistillation, k = {k}: {received:,} B per exchange, {received / k:,.0f} B per step "
              f"({received / k / per_step:.1f}x the outputs)")


if __name__ == "__main__":
    main()
