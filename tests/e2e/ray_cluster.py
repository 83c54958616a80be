"""A Ray cluster of two simulated nodes on loopback only, for the tests of `--executor ray`.

Run by tests/e2e/ray.rs with the project's Python: prints the cluster's address on its first
line, then keeps the cluster up until its stdin closes (the test ends, however it ends), and
shuts it down. Loopback only, as shared/notes/ray.md says: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in
this process (and the test's), and the second node simulated by ray.cluster_utils.Cluster.

    python ray_cluster.py TEMP_DIR [NODES]      (default 2 nodes of one CPU each)
"""

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
# Everything Ray writes (sessions, logs, the "current cluster" file) under the test's folder.
os.environ["RAY_TMPDIR"] = sys.argv[1]
os.makedirs(os.path.join(sys.argv[1], "ray"), exist_ok=True)

from ray.cluster_utils import Cluster  # noqa: E402

node = dict(num_cpus=1, num_gpus=0, object_store_memory=80_000_000)
cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, temp_dir=os.path.join(sys.argv[1], "ray"), **node))
for _ in range(int(sys.argv[2]) - 1 if len(sys.argv) > 2 else 1):
    cluster.add_node(**node)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
try:
    sys.stdin.read()
finally:
    cluster.shutdown()
