"""Pods: workload manifests turned into pod plans, and pod lists as kubectl writes them."""
