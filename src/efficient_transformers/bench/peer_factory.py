"""The memory probe's entry to the peer layers of `bench.peers` (its `Workload.factory`).

`harness.load_factory` imports a factory file by path, outside the package, so this file names the
package absolutely; `bench/peers.py` itself uses relative imports and cannot be loaded that way.
"""

from efficient_transformers.bench.peers import build_peer

__all__ = ["build_peer"]
