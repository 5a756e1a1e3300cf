"""Checks for the production cluster files (ray_cluster/kuberay/*.yaml, ray_cluster/cluster.yaml)."""
