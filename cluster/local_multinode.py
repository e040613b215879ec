"""Run kd-ops on a multi-node Ray cluster simulated on one machine (ray.cluster_utils.Cluster): a
head with no CPUs (the driver only, as on a real cluster) and worker nodes with their own
resources, teachers and students on separate node groups.

    python cluster/local_multinode.py workflows/configs/mnist1d.yaml --out runs/multinode \\
        --teacher-nodes 1 --student-nodes 1 --cpus-per-node 1

Teacher nodes carry the custom resource `teacher_node`, student nodes `student_node`; the run is
pinned to them with precompute.resources / train.resources (set here with --set). The nodes share
this machine's disk, which stands in for the shared storage (an object store URI or NFS) that a
real multi-node run needs for --out. Extra arguments go to `kd run`.
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
    ap.add_argument("--teacher-nodes", type=int, default=1)
    ap.add_argument("--student-nodes", type=int, default=1)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    args, rest = ap.parse_known_args()
    # the dashboard serves the state API that Ray Train uses to free a stopped Tune trial's placement group
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    for _ in range(args.teacher_nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, resources={"teacher_node": 1})
    for _ in range(args.student_nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, resources={"student_node": 1})
    cluster.wait_for_nodes()
    pins = ["--set", f"precompute.resources={{teacher_node: {1 / args.cpus_per_node:g}}}",
            "--set", f"train.resources={{student_node: {1 / args.cpus_per_node:g}}}"]
    try:
        raise SystemExit(main(["run", args.config, "--out", args.out, "--ray-address", cluster.address, *pins, *rest]))
    finally:
        cluster.shutdown()
