"""Run the pipeline on a 2-node Ray cluster simulated on one machine (ray.cluster_utils.Cluster).

    python cluster/local_multinode.py workflows/configs/mnist1d.yaml --out runs/multinode

Both "nodes" share this machine's disk, which stands in for the shared storage (NFS or an
object store URI) that a real multi-node run needs for --out.
"""
import argparse
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ray.cluster_utils import Cluster  # noqa: E402

from workflows.cli import main  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", default="runs/multinode")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    args, rest = ap.parse_known_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    try:
        raise SystemExit(main(["run", args.config, "--out", args.out, "--ray-address", cluster.address, *rest]))
    finally:
        cluster.shutdown()
