"""Deployment recipes generated from a topology: Kubernetes manifests, systemd units, a container recipe.

Nothing here is written by hand for one model: every object is derived from
``topology.yaml`` (Jina's ``Flow.to_kubernetes_yaml`` convention), so a
re-partitioned model is redeployed by generating again. See docs/DEPLOY.md.
"""
